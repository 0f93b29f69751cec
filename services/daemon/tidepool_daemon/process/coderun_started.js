// Preloaded (`node --require`) into JavaScript and TypeScript code runs: tells the daemon that the runtime
// is up and the user's code starts now, so a code_run time-out measures the user's code, not node's or
// ts-node's start-up (see coderun.py). The variable is removed first, so the user's code never sees it.
"use strict";
const raw = process.env.TIDEPOOL_CODE_RUN_STARTED_FD;
delete process.env.TIDEPOOL_CODE_RUN_STARTED_FD;
if (raw !== undefined && /^[0-9]+$/.test(raw)) {
  const fs = require("fs");
  try {
    fs.writeSync(Number(raw), "1");
    fs.closeSync(Number(raw));
  } catch (error) {
    // The daemon gave up waiting: nothing to tell it any more.
  }
}
