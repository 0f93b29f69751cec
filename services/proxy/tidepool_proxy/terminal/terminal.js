// The sandbox's web terminal: xterm.js over a PTY in the sandbox (the toolbox's PTY WebSocket, relayed by
// the proxy). The preview token this page was opened with (?DAYTONA_SANDBOX_AUTH_KEY=) opens the socket.
const status = document.getElementById("status");
const term = new Terminal({ cursorBlink: true, fontSize: 14, screenReaderMode: true });
const fit = new FitAddon.FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("terminal"));
fit.fit();
const query = new URLSearchParams(location.search);
const socketQuery = new URLSearchParams({ cols: String(term.cols), rows: String(term.rows) });
const token = query.get("DAYTONA_SANDBOX_AUTH_KEY");
if (token) socketQuery.set("DAYTONA_SANDBOX_AUTH_KEY", token);
const scheme = location.protocol === "https:" ? "wss" : "ws";
const socket = new WebSocket(`${scheme}://${location.host}/__tidepool/terminal/pty?${socketQuery}`,
  ["X-Daytona-Pty-Exit-Control"]);
socket.binaryType = "arraybuffer";
const decoder = new TextDecoder();
socket.onopen = () => { status.textContent = "Terminal: connected"; };
socket.onmessage = (message) => {
  if (typeof message.data === "string") {
    try {
      const control = JSON.parse(message.data);
      if (control.type === "control") {
        if (control.status === "exited") status.textContent = `Terminal: exited (${control.exitCode})`;
        return;
      }
    } catch { /* plain output */ }
    term.write(message.data);
  } else term.write(decoder.decode(message.data, { stream: true }));
};
socket.onclose = () => { if (!status.textContent.includes("exited")) status.textContent = "Terminal: closed"; };
socket.onerror = () => { status.textContent = "Terminal: error"; };
term.onData((data) => socket.readyState === WebSocket.OPEN && socket.send(data));
window.addEventListener("resize", () => fit.fit());
term.focus();
