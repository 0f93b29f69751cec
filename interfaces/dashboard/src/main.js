// Tidepool dashboard: Preact + htm (no JSX build step), Socket.IO for live states, xterm.js for terminals.
import { render } from "preact";
import { useCallback, useEffect, useMemo, useRef, useState } from "preact/hooks";
import htm from "htm";
import { h } from "preact";
import { io } from "socket.io-client";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "@xterm/xterm/css/xterm.css";
import "./style.css";
import { api, apiBase, listAllSandboxes, ptySocket, session, toolbox } from "./api.js";

const html = htm.bind(h);
const SECTIONS = ["Sandboxes", "Snapshots", "Volumes", "API keys", "Audit log"];
const ROW_HEIGHT = 40;
const VISIBLE_ROWS = 14;
const POLL_MS = 15000;

function useAsync(load, deps) {
  const [state, setState] = useState({ loading: true, data: null, error: null });
  const reload = useCallback(() => {
    setState((old) => ({ ...old, loading: true }));
    load().then(
      (data) => setState({ loading: false, data, error: null }),
      (error) => setState({ loading: false, data: null, error }),
    );
  }, deps);
  useEffect(reload, [reload]);
  return [state, reload];
}

function ErrorText({ error }) {
  return error ? html`<p role="alert" class="error">${error.message}</p>` : null;
}

function parseLabels(text) {
  const labels = {};
  for (const part of text.split(",")) {
    const [key, ...rest] = part.split("=");
    if (key.trim()) labels[key.trim()] = rest.join("=").trim();
  }
  return labels;
}

const formatLabels = (labels) =>
  Object.entries(labels || {})
    .map(([k, v]) => `${k}=${v}`)
    .join(", ");

// ----- sign in ---------------------------------------------------------------------------------------------

function SignIn({ onSignedIn }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    try {
      await api("/api-keys/current", { key: key.trim() });
      session.key = key.trim();
      onSignedIn();
    } catch (failure) {
      setError(failure);
    }
  };
  return html`<main class="signin">
    <h1>Tidepool</h1>
    <form onSubmit=${submit} aria-labelledby="signin-title">
      <h2 id="signin-title">Sign in</h2>
      <label for="api-key">API key</label>
      <input id="api-key" type="password" autocomplete="off" required value=${key}
        onInput=${(e) => setKey(e.currentTarget.value)} />
      <button type="submit">Sign in</button>
      <${ErrorText} error=${error} />
    </form>
  </main>`;
}

// ----- sandboxes -------------------------------------------------------------------------------------------

/** All sandboxes by id, kept live by Socket.IO (`sandbox.created`, `sandbox.state.updated`); polls when the
 * socket is down. */
function useLiveSandboxes() {
  const [sandboxes, setSandboxes] = useState(() => new Map());
  const [error, setError] = useState(null);
  const [live, setLive] = useState(false);
  const [loaded, setLoaded] = useState(false);
  const reload = useCallback(async () => {
    try {
      const toMap = (items) => new Map(items.map((s) => [s.id, s]));
      const items = await listAllSandboxes((soFar) => setSandboxes((old) => new Map([...old, ...toMap(soFar)])));
      setSandboxes(toMap(items));
      setLoaded(true);
      setError(null);
    } catch (failure) {
      setError(failure);
    }
  }, []);
  const upsert = useCallback((sandbox) => {
    setSandboxes((old) => new Map(old).set(sandbox.id, sandbox));
  }, []);
  const remove = useCallback((id) => {
    setSandboxes((old) => {
      const next = new Map(old);
      next.delete(id);
      return next;
    });
  }, []);
  useEffect(() => {
    reload();
    const socket = io(location.origin, {
      path: "/api/socket.io/",
      transports: ["websocket"],
      auth: { token: session.key },
    });
    socket.on("connect", () => {
      setLive(true);
      reload(); // whatever changed while disconnected
    });
    socket.on("disconnect", () => setLive(false));
    socket.on("sandbox.created", (payload) => upsert(payload.sandbox || payload));
    socket.on("sandbox.state.updated", (payload) => upsert(payload.sandbox));
    const timer = setInterval(() => {
      if (!socket.connected) reload();
    }, POLL_MS);
    return () => {
      clearInterval(timer);
      socket.close();
    };
  }, []);
  return { sandboxes, error, live, loaded, reload, upsert, remove };
}

function CreateSandbox({ onCreated }) {
  const [form, setForm] = useState({ name: "", snapshot: "", cpu: "", memory: "", disk: "", labels: "" });
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const field = (name, label, type = "text") => html`<label>
    ${label}
    <input name=${name} type=${type} min="1" value=${form[name]}
      onInput=${(e) => setForm({ ...form, [name]: e.currentTarget.value })} />
  </label>`;
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    const body = { labels: parseLabels(form.labels) };
    if (form.name) body.name = form.name;
    if (form.snapshot) body.snapshot = form.snapshot;
    for (const n of ["cpu", "memory", "disk"]) if (form[n]) body[n] = Number(form[n]);
    try {
      onCreated(await api("/sandbox", { method: "POST", body }));
      setForm({ ...form, name: "" });
    } catch (failure) {
      setError(failure);
    } finally {
      setBusy(false);
    }
  };
  return html`<form class="create" onSubmit=${submit} aria-label="Create sandbox">
    ${field("name", "Name")} ${field("snapshot", "Snapshot")} ${field("cpu", "CPU", "number")}
    ${field("memory", "Memory (GiB)", "number")} ${field("disk", "Disk (GiB)", "number")}
    ${field("labels", "Labels (k=v, …)")}
    <button type="submit" disabled=${busy}>${busy ? "Creating…" : "Create sandbox"}</button>
    <${ErrorText} error=${error} />
  </form>`;
}

/** A windowed table: only the rows in view are in the DOM, so 1,000+ sandboxes render at once. */
function SandboxTable({ rows, selected, onSelect }) {
  const [scrollTop, setScrollTop] = useState(0);
  const first = Math.max(0, Math.floor(scrollTop / ROW_HEIGHT) - 2);
  const last = Math.min(rows.length, first + VISIBLE_ROWS + 4);
  const onKeyDown = (event, index) => {
    const next = event.key === "ArrowDown" ? index + 1 : event.key === "ArrowUp" ? index - 1 : null;
    if (next === null || next < 0 || next >= rows.length) return;
    event.preventDefault();
    const body = event.currentTarget.closest(".rows");
    body.scrollTop = Math.min(body.scrollTop, next * ROW_HEIGHT);
    if ((next + 1) * ROW_HEIGHT > body.scrollTop + body.clientHeight)
      body.scrollTop = (next + 1) * ROW_HEIGHT - body.clientHeight;
    requestAnimationFrame(() => body.querySelector(`[aria-rowindex="${next + 2}"] button`)?.focus());
  };
  return html`<div role="table" aria-label="Sandboxes" aria-rowcount=${rows.length + 1} class="table">
    <div role="rowgroup"><div role="row" class="row head" aria-rowindex="1">
      <span role="columnheader">Name</span><span role="columnheader">State</span>
      <span role="columnheader">Resources</span><span role="columnheader">Labels</span>
    </div></div>
    <div role="rowgroup" class="rows" style=${{ height: `${VISIBLE_ROWS * ROW_HEIGHT}px` }}
      onScroll=${(e) => setScrollTop(e.currentTarget.scrollTop)}>
      <div style=${{ height: `${rows.length * ROW_HEIGHT}px`, position: "relative" }}>
        ${rows.slice(first, last).map((s, offset) => {
          const index = first + offset;
          return html`<div role="row" key=${s.id} aria-rowindex=${index + 2} data-sandbox-id=${s.id}
            class=${`row${selected === s.id ? " selected" : ""}`}
            style=${{ top: `${index * ROW_HEIGHT}px` }} aria-selected=${selected === s.id}>
            <span role="cell"><button class="link" onClick=${() => onSelect(s.id)}
              onKeyDown=${(e) => onKeyDown(e, index)}>${s.name || s.id}</button></span>
            <span role="cell" class=${`state state-${s.state}`} data-state=${s.state}>${s.state}</span>
            <span role="cell">${s.cpu} CPU · ${s.memory} GiB · ${s.disk} GiB</span>
            <span role="cell" class="labels">${formatLabels(s.labels)}</span>
          </div>`;
        })}
      </div>
    </div>
  </div>`;
}

function Sandboxes() {
  const { sandboxes, error, live, loaded, reload, upsert, remove } = useLiveSandboxes();
  const [selected, setSelected] = useState(null);
  const [filter, setFilter] = useState("");
  const rows = useMemo(() => {
    const all = [...sandboxes.values()].sort((a, b) => (b.createdAt || "").localeCompare(a.createdAt || ""));
    const needle = filter.trim().toLowerCase();
    return needle
      ? all.filter((s) => `${s.name} ${s.id} ${formatLabels(s.labels)}`.toLowerCase().includes(needle))
      : all;
  }, [sandboxes, filter]);
  const current = selected ? sandboxes.get(selected) : null;
  return html`<section aria-labelledby="sandboxes-title">
    <h2 id="sandboxes-title">Sandboxes <small class="count" data-loaded=${loaded}>${sandboxes.size}</small>
      <span class=${live ? "live on" : "live"} role="status">${live ? "live" : "polling"}</span></h2>
    <${CreateSandbox} onCreated=${(s) => { upsert(s); setSelected(s.id); }} />
    <div class="toolbar">
      <label>Filter <input type="search" value=${filter} onInput=${(e) => setFilter(e.currentTarget.value)} /></label>
      <button onClick=${reload}>Refresh</button>
    </div>
    <${ErrorText} error=${error} />
    <div class="split">
      <${SandboxTable} rows=${rows} selected=${selected} onSelect=${setSelected} />
      ${current && html`<${SandboxDetail} key=${current.id} sandbox=${current} onChanged=${upsert}
        onDeleted=${(id) => { remove(id); setSelected(null); }} />`}
    </div>
  </section>`;
}

function SandboxDetail({ sandbox, onChanged, onDeleted }) {
  const [error, setError] = useState(null);
  const [tab, setTab] = useState("events");
  const [labels, setLabels] = useState(formatLabels(sandbox.labels));
  const act = async (action) => {
    setError(null);
    try {
      if (action === "delete") {
        await api(`/sandbox/${sandbox.id}`, { method: "DELETE" });
        onDeleted(sandbox.id);
      } else onChanged(await api(`/sandbox/${sandbox.id}/${action}`, { method: "POST" }));
    } catch (failure) {
      setError(failure);
    }
  };
  const saveLabels = async (event) => {
    event.preventDefault();
    try {
      const saved = await api(`/sandbox/${sandbox.id}/labels`, { method: "PUT", body: { labels: parseLabels(labels) } });
      onChanged({ ...sandbox, labels: saved.labels });
    } catch (failure) {
      setError(failure);
    }
  };
  const started = sandbox.state === "started";
  const tabs = ["events", "terminal", "files"];
  return html`<aside class="detail" aria-label=${`Sandbox ${sandbox.name || sandbox.id}`}>
    <h3>${sandbox.name || sandbox.id}</h3>
    <dl>
      <dt>ID</dt><dd>${sandbox.id}</dd>
      <dt>State</dt><dd data-testid="detail-state" data-state=${sandbox.state}>${sandbox.state}</dd>
      <dt>Snapshot</dt><dd>${sandbox.snapshot || "—"}</dd>
      <dt>Resources</dt><dd>${sandbox.cpu} CPU, ${sandbox.memory} GiB memory, ${sandbox.disk} GiB disk</dd>
      ${sandbox.errorReason && html`<dt>Error</dt><dd>${sandbox.errorReason}</dd>`}
    </dl>
    <div class="actions">
      <button onClick=${() => act("start")} disabled=${started}>Start</button>
      <button onClick=${() => act("stop")} disabled=${!started}>Stop</button>
      <button class="danger" onClick=${() => confirm(`Delete ${sandbox.name || sandbox.id}?`) && act("delete")}>Delete</button>
    </div>
    <form onSubmit=${saveLabels} class="inline">
      <label>Labels <input value=${labels} onInput=${(e) => setLabels(e.currentTarget.value)} /></label>
      <button type="submit">Save labels</button>
    </form>
    <${ErrorText} error=${error} />
    <div role="tablist" aria-label="Sandbox views">
      ${tabs.map((name) => html`<button role="tab" id=${`tab-${name}`} aria-selected=${tab === name}
        aria-controls=${`panel-${name}`} onClick=${() => setTab(name)}>${name[0].toUpperCase() + name.slice(1)}</button>`)}
    </div>
    <div role="tabpanel" id=${`panel-${tab}`} aria-labelledby=${`tab-${tab}`}>
      ${tab === "events" && html`<${Events} sandbox=${sandbox} />`}
      ${tab === "terminal" && (started ? html`<${Term} sandbox=${sandbox} />` : html`<p>Start the sandbox to open a terminal.</p>`)}
      ${tab === "files" && (started ? html`<${Files} sandbox=${sandbox} />` : html`<p>Start the sandbox to browse its files.</p>`)}
    </div>
  </aside>`;
}

function Events({ sandbox }) {
  const [{ data, error }] = useAsync(() => api(`/sandbox/${sandbox.id}/events?limit=100`), [sandbox.id, sandbox.state]);
  return html`<div>
    <${ErrorText} error=${error} />
    <ol class="events" aria-label="Events">
      ${(data || []).map((e) => {
        const { type, occurredAt, ...rest } = e;
        return html`<li><time datetime=${occurredAt}>${new Date(occurredAt).toLocaleString()}</time>
          <strong>${type}</strong> <code>${JSON.stringify(rest)}</code></li>`;
      })}
    </ol>
  </div>`;
}

function Term({ sandbox }) {
  const host = useRef(null);
  const [status, setStatus] = useState("connecting");
  useEffect(() => {
    const term = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 13, screenReaderMode: true });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(host.current);
    fit.fit();
    const socket = ptySocket(sandbox, `dashboard-${Math.random().toString(36).slice(2, 10)}`, term.cols, term.rows);
    const decoder = new TextDecoder();
    socket.onopen = () => setStatus("connected");
    socket.onmessage = (message) => {
      if (typeof message.data === "string") {
        try {
          const control = JSON.parse(message.data);
          if (control.type === "control") {
            if (control.status === "exited") setStatus(`exited (${control.exitCode})`);
            return;
          }
        } catch {
          /* plain text output */
        }
        term.write(message.data);
      } else term.write(decoder.decode(message.data, { stream: true }));
    };
    socket.onclose = () => setStatus((s) => (s.startsWith("exited") ? s : "closed"));
    socket.onerror = () => setStatus("error");
    const input = term.onData((data) => socket.readyState === WebSocket.OPEN && socket.send(data));
    term.focus();
    return () => {
      input.dispose();
      socket.close();
      term.dispose();
    };
  }, [sandbox.id]);
  return html`<div>
    <p role="status" class="term-status">Terminal: ${status}</p>
    <div ref=${host} class="terminal" aria-label="Terminal"></div>
  </div>`;
}

function Files({ sandbox }) {
  const [path, setPath] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    toolbox(sandbox, "/work-dir").then((r) => setPath(r.dir), setError);
  }, [sandbox.id]);
  const [listing, reload] = useAsync(
    () => (path ? toolbox(sandbox, `/files?${new URLSearchParams({ path })}`) : Promise.resolve([])),
    [sandbox.id, path],
  );
  const join = (name) => `${path.replace(/\/$/, "")}/${name}`;
  const upload = async (event) => {
    const file = event.currentTarget.files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    try {
      await toolbox(sandbox, `/files/upload-v2?${new URLSearchParams({ path: join(file.name) })}`, { method: "POST", body: form });
      event.target.value = "";
      reload();
    } catch (failure) {
      setError(failure);
    }
  };
  const download = async (name) => {
    try {
      const response = await toolbox(sandbox, `/files/download?${new URLSearchParams({ path: join(name) })}`, { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const link = document.createElement("a");
      link.href = url;
      link.download = name;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (failure) {
      setError(failure);
    }
  };
  const up = () => setPath(path.replace(/\/[^/]+\/?$/, "") || "/");
  return html`<div class="files">
    <form class="inline" onSubmit=${(e) => { e.preventDefault(); setPath(e.currentTarget.elements.path.value); }}>
      <label>Folder <input name="path" value=${path || ""} /></label><button type="submit">Go</button>
      <button type="button" onClick=${up}>Up</button>
    </form>
    <label class="upload">Upload file <input type="file" disabled=${!path} onChange=${upload} /></label>
    <${ErrorText} error=${error || listing.error} />
    <ul aria-label="Files" class="file-list">
      ${(listing.data || []).map((f) => html`<li>
        ${f.isDir
          ? html`<button class="link" onClick=${() => setPath(join(f.name))}>${f.name}/</button>`
          : html`<span>${f.name}</span> <small>${f.size} B</small>
            <button onClick=${() => download(f.name)} aria-label=${`Download ${f.name}`}>Download</button>`}
      </li>`)}
    </ul>
  </div>`;
}

// ----- snapshots, volumes, keys, audit ---------------------------------------------------------------------

function Snapshots() {
  const [{ data, error }, reload] = useAsync(() => api("/snapshots?limit=100"), []);
  const [logs, setLogs] = useState(null);
  const [form, setForm] = useState({ name: "", imageName: "" });
  const [failure, setFailure] = useState(null);
  const showLogs = async (s) => {
    setLogs({ name: s.name, text: "loading…" });
    try {
      setLogs({ name: s.name, text: await api(`/snapshots/${encodeURIComponent(s.id)}/build-logs`) });
    } catch (e) {
      setLogs({ name: s.name, text: e.message });
    }
  };
  const create = async (event) => {
    event.preventDefault();
    try {
      await api("/snapshots", { method: "POST", body: form });
      reload();
    } catch (e) {
      setFailure(e);
    }
  };
  return html`<section aria-labelledby="snapshots-title">
    <h2 id="snapshots-title">Snapshots</h2>
    <form class="inline" onSubmit=${create} aria-label="Create snapshot">
      <label>Name <input value=${form.name} required onInput=${(e) => setForm({ ...form, name: e.currentTarget.value })} /></label>
      <label>Image <input value=${form.imageName} required onInput=${(e) => setForm({ ...form, imageName: e.currentTarget.value })} /></label>
      <button type="submit">Create snapshot</button>
    </form>
    <${ErrorText} error=${error || failure} />
    <table><caption>Snapshots</caption>
      <thead><tr><th scope="col">Name</th><th scope="col">State</th><th scope="col">Image</th><th scope="col">Logs</th></tr></thead>
      <tbody>${(data?.items || []).map((s) => html`<tr key=${s.id}><td>${s.name}</td><td>${s.state}</td>
        <td>${s.imageName}</td><td><button onClick=${() => showLogs(s)}>Build logs</button></td></tr>`)}</tbody>
    </table>
    ${logs && html`<h3>Build logs: ${logs.name}</h3><pre class="logs" tabindex="0">${logs.text}</pre>`}
  </section>`;
}

function Volumes() {
  const [{ data, error }, reload] = useAsync(() => api("/volumes"), []);
  const [name, setName] = useState("");
  const [failure, setFailure] = useState(null);
  const run = (promise) => promise.then(reload, setFailure);
  return html`<section aria-labelledby="volumes-title">
    <h2 id="volumes-title">Volumes</h2>
    <form class="inline" aria-label="Create volume" onSubmit=${(e) => { e.preventDefault(); run(api("/volumes", { method: "POST", body: { name } })); }}>
      <label>Name <input value=${name} required onInput=${(e) => setName(e.currentTarget.value)} /></label>
      <button type="submit">Create volume</button>
    </form>
    <${ErrorText} error=${error || failure} />
    <table><caption>Volumes</caption>
      <thead><tr><th scope="col">Name</th><th scope="col">State</th><th scope="col">Created</th><th scope="col"><span class="sr">Actions</span></th></tr></thead>
      <tbody>${(data || []).map((v) => html`<tr key=${v.id}><td>${v.name}</td><td>${v.state}</td><td>${v.createdAt}</td>
        <td><button class="danger" onClick=${() => run(api(`/volumes/${v.id}`, { method: "DELETE" }))}>Delete</button></td></tr>`)}</tbody>
    </table>
  </section>`;
}

function ApiKeys() {
  const [{ data, error }, reload] = useAsync(() => api("/api-keys"), []);
  const [name, setName] = useState("");
  const [created, setCreated] = useState(null);
  const [failure, setFailure] = useState(null);
  const create = async (event) => {
    event.preventDefault();
    try {
      setCreated(await api("/api-keys", { method: "POST", body: { name } }));
      reload();
    } catch (e) {
      setFailure(e);
    }
  };
  return html`<section aria-labelledby="keys-title">
    <h2 id="keys-title">API keys</h2>
    <form class="inline" aria-label="Create API key" onSubmit=${create}>
      <label>Name <input value=${name} required onInput=${(e) => setName(e.currentTarget.value)} /></label>
      <button type="submit">Create key</button>
    </form>
    ${created && html`<p role="status">New key (shown once): <code>${created.value}</code></p>`}
    <${ErrorText} error=${error || failure} />
    <table><caption>API keys</caption>
      <thead><tr><th scope="col">Name</th><th scope="col">Key</th><th scope="col">Permissions</th><th scope="col">Created</th><th scope="col"><span class="sr">Actions</span></th></tr></thead>
      <tbody>${(data || []).map((k) => html`<tr key=${k.name}><td>${k.name}</td><td><code>${k.value}</code></td>
        <td>${(k.permissions || []).join(", ")}</td><td>${k.createdAt}</td>
        <td><button class="danger" onClick=${() => api(`/api-keys/${encodeURIComponent(k.name)}`, { method: "DELETE" }).then(reload, setFailure)}>Revoke</button></td></tr>`)}</tbody>
    </table>
  </section>`;
}

function AuditLog() {
  const [page, setPage] = useState(1);
  const [{ data, error }] = useAsync(() => api(`/audit-logs?page=${page}&limit=50`), [page]);
  return html`<section aria-labelledby="audit-title">
    <h2 id="audit-title">Audit log</h2>
    <${ErrorText} error=${error} />
    <table><caption>Audit log, page ${page}${data ? ` of ${data.totalPages}` : ""}</caption>
      <thead><tr><th scope="col">When</th><th scope="col">Action</th><th scope="col">Target</th><th scope="col">Status</th><th scope="col">Key</th></tr></thead>
      <tbody>${(data?.items || []).map((r) => html`<tr key=${r.id}><td>${r.createdAt}</td><td>${r.action}</td>
        <td>${r.targetType} ${r.targetId || ""}</td><td>${r.statusCode}</td><td>${r.actorApiKeyPrefix}</td></tr>`)}</tbody>
    </table>
    <nav aria-label="Audit pages" class="inline">
      <button disabled=${page <= 1} onClick=${() => setPage(page - 1)}>Previous</button>
      <button disabled=${!data || page >= data.totalPages} onClick=${() => setPage(page + 1)}>Next</button>
    </nav>
  </section>`;
}

// ----- shell -----------------------------------------------------------------------------------------------

function App() {
  const [signedIn, setSignedIn] = useState(Boolean(session.key));
  const [section, setSection] = useState(SECTIONS[0]);
  if (!signedIn) return html`<${SignIn} onSignedIn=${() => setSignedIn(true)} />`;
  const signOut = () => {
    session.key = null;
    setSignedIn(false);
  };
  const View = { Sandboxes, Snapshots, Volumes, "API keys": ApiKeys, "Audit log": AuditLog }[section];
  return html`<div class="shell">
    <header>
      <h1>Tidepool</h1>
      <nav aria-label="Sections">
        ${SECTIONS.map((name) => html`<button aria-current=${section === name ? "page" : undefined}
          onClick=${() => setSection(name)}>${name}</button>`)}
      </nav>
      <button class="signout" onClick=${signOut}>Sign out</button>
    </header>
    <main><${View} /></main>
  </div>`;
}

window.__tidepoolApi = apiBase;
render(html`<${App} />`, document.getElementById("app"));
