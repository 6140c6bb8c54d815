// The taskserver dashboard: polls the JSON endpoints under /dashboard/api and renders them.
// No framework and no build step. Every value that came from the server (and so maybe from a
// client: user_id, payload, error text) reaches the page through textContent, never as HTML.
"use strict";

(function () {
  const DEAD_PAGE_SIZE = 20;
  // A request that hangs is given up, so that one stuck answer cannot stop the polling.
  const REQUEST_TIMEOUT_MS = 10000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART = { width: 640, height: 170, left: 44, right: 8, top: 10, bottom: 22 };

  const state = {
    csrfToken: "",
    readOnly: true,
    pollIntervalMs: 2000,
    timer: null, // the next poll's setTimeout, when one is scheduled
    inFlight: false, // a poll is running: never start a second one
    again: false, // an action asked for a fresh poll while one was running
    deadOffset: 0,
    deadShown: "", // the dead-letter page last rendered, to leave the rows alone when unchanged
    deadTotal: 0,
    confirmAction: null,
  };

  const byId = (id) => document.getElementById(id);

  // --- small DOM helpers -------------------------------------------------------------------

  function setText(id, value) {
    byId(id).textContent = value === null || value === undefined ? "–" : String(value);
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : element("td", cell));
    return tr;
  }

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- formatting ------------------------------------------------------------------------------

  function count(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "–";
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 0)} ms`;
    if (s < 120) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    return duration(s);
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    const total = Math.floor(s);
    const d = Math.floor(total / 86400);
    const h = Math.floor((total % 86400) / 3600);
    const m = Math.floor((total % 3600) / 60);
    const sec = total % 60;
    if (d > 0) return `${d}d ${h}h`;
    if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
  }

  function bytes(n) {
    if (typeof n !== "number") return "–";
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    if (n < 1024 * 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
    return `${(n / 1024 / 1024 / 1024).toFixed(2)} GiB`;
  }

  function clockTime(epochMs) {
    return new Date(epochMs).toLocaleTimeString("en-GB");
  }

  function dateTime(epochMs) {
    return new Date(epochMs).toLocaleString("sv-SE"); // 2026-12-01 23:15:44, local time
  }

  function perSecond(value) {
    return typeof value === "number" ? value.toFixed(value < 10 ? 2 : 1) : "–";
  }

  // --- talking to the server ---------------------------------------------------------------

  // {status, body}; status 0 when the server could not be reached at all. An action
  // refused for its CSRF token (the cluster restarted: its secret changed) fetches
  // the session's new token and is sent once more.
  async function request(method, path) {
    const answer = await send(method, path);
    if (method === "POST" && answer.status === 403 && answer.body && answer.body.error === "invalid_csrf_token") {
      const session = await send("GET", "/dashboard/api/session");
      if (session.status === 200) {
        state.csrfToken = session.body.csrf_token;
        return send(method, path);
      }
    }
    return answer;
  }

  async function send(method, path) {
    const options = {
      method,
      credentials: "same-origin",
      headers: { Accept: "application/json" },
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    };
    if (method === "POST") {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRF-Token"] = state.csrfToken;
      options.body = "{}";
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (error) {
      return { status: 0, body: { error: "unreachable", message: String(error) } };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = { error: "bad_answer", message: `not JSON (HTTP ${response.status})` };
    }
    if (response.status === 401) window.location.assign("/dashboard/login");
    return { status: response.status, body };
  }

  function setStatus(label, kind) {
    const line = byId("status-line");
    line.textContent = label;
    line.dataset.state = kind;
  }

  // --- polling ---------------------------------------------------------------------------------

  // The next poll starts only after this one finished (never two in flight), and none while
  // the tab is hidden; visibilitychange resumes it.
  function schedule(delayMs) {
    if (state.timer !== null || state.inFlight || document.hidden) return;
    state.timer = window.setTimeout(poll, delayMs);
  }

  async function poll() {
    state.timer = null;
    if (document.hidden) {
      setStatus("paused", "paused");
      return;
    }
    state.inFlight = true;
    state.again = false;
    try {
      await Promise.all([refreshOverview(), refreshDead()]);
    } finally {
      state.inFlight = false;
      schedule(state.again ? 0 : state.pollIntervalMs);
    }
  }

  // After an action: poll now, or as soon as the running poll is done.
  function pollSoon() {
    if (state.inFlight) {
      state.again = true;
      return;
    }
    if (state.timer !== null) window.clearTimeout(state.timer);
    state.timer = null;
    schedule(0);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      if (state.timer !== null) window.clearTimeout(state.timer);
      state.timer = null;
      setStatus("paused", "paused");
    } else {
      schedule(0);
    }
  });

  // --- overview ------------------------------------------------------------------------------

  async function refreshOverview() {
    const { status, body } = await request("GET", "/dashboard/api/overview");
    if (status === 200) {
      renderOverview(body);
      if (document.hidden) setStatus("paused", "paused");
      else setStatus("live", "live");
      setText("updated-at", `updated ${clockTime(body.now * 1000)}`);
    } else if (status === 503) {
      setStatus("Redis down", "down");
      setText("redis-status", "down");
      byId("redis-status").dataset.state = "down";
    } else if (status === 0) {
      setStatus("server unreachable", "down");
    } else if (status !== 401) {
      setStatus(`error: ${body && body.message ? body.message : status}`, "down");
    }
  }

  function renderOverview(data) {
    const queue = data.queue;
    setText("count-pending", count(queue.pending));
    setText("count-processing", count(queue.processing));
    setText("count-delayed", count(queue.delayed));
    setText("count-dead", count(queue.dead));
    setText("count-suspects", count(queue.suspects));
    setText("oldest-pending", queue.oldest_pending_age_s === null ? "–" : seconds(queue.oldest_pending_age_s));
    for (const name of ["enqueued", "completed", "failed", "retried", "dead", "reclaimed"]) {
      setText(`total-${name}`, count(data.totals[name]));
    }
    renderLatency(data.latency);
    renderRateLimited(data.rate_limited);
    renderThroughput(data.throughput);
    renderWorkers(data.workers);
    renderRedis(data.redis);
  }

  function renderLatency(latency) {
    setText("latency-window", duration(latency.window_s));
    setText("wait-p50", seconds(latency.wait.p50));
    setText("wait-p95", seconds(latency.wait.p95));
    setText("run-p50", seconds(latency.run.p50));
    setText("run-p95", seconds(latency.run.p95));
  }

  function renderRateLimited(tiers) {
    const body = byId("rate-limited");
    const rows = Object.entries(tiers).map(([tier, n]) => row([element("th", tier), count(n)]));
    if (rows.length === 0) rows.push(row(["no tiers"]));
    body.replaceChildren(...rows);
  }

  function renderWorkers(workers) {
    setText("worker-count", workers.length);
    const rows = workers.map((w) =>
      row([w.process_id, w.pid, w.host, duration(w.uptime_s), count(w.restarts), count(w.in_flight), count(w.connections)])
    );
    if (rows.length === 0) rows.push(row([element("td", "no live workers", "muted")]));
    byId("workers").replaceChildren(...rows);
  }

  function renderRedis(redis) {
    const status = byId("redis-status");
    status.textContent = redis.up ? "up" : "down";
    status.dataset.state = redis.up ? "live" : "down";
    setText("redis-address", redis.address);
    setText("redis-kind", redis.embedded ? "embedded (started by taskserver)" : "external");
    setText("redis-memory", bytes(redis.used_memory_bytes));
    setText("redis-version", redis.version);
  }

  // Completed and failed per second, one point per history sample, drawn as two polylines.
  function renderThroughput(points) {
    const chart = byId("throughput-chart");
    const { width, height, left, right, top, bottom } = CHART;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    const nodes = [svg("rect", { x: left, y: top, width: plotWidth, height: plotHeight, class: "plot" })];
    const last = points.length ? points[points.length - 1] : null;
    setText("rate-completed", last ? perSecond(last.completed_per_s) : "–");
    setText("rate-failed", last ? perSecond(last.failed_per_s) : "–");
    if (points.length < 2) {
      nodes.push(svg("text", { x: left + plotWidth / 2, y: top + plotHeight / 2, class: "empty" }, "collecting history…"));
      chart.replaceChildren(...nodes);
      return;
    }
    const first = points[0].t;
    const span = Math.max(last.t - first, 1);
    const peak = Math.max(...points.map((p) => Math.max(p.completed_per_s, p.failed_per_s)));
    const top_ = niceCeiling(peak);
    const x = (t) => left + ((t - first) / span) * plotWidth;
    const y = (v) => top + plotHeight - (v / top_) * plotHeight;
    for (const fraction of [0.5, 1]) {
      const v = top_ * fraction;
      nodes.push(svg("line", { x1: left, x2: left + plotWidth, y1: y(v), y2: y(v), class: "gridline" }));
      nodes.push(svg("text", { x: left - 4, y: y(v) + 4, class: "axis end" }, perSecond(v)));
    }
    nodes.push(svg("text", { x: left - 4, y: top + plotHeight + 4, class: "axis end" }, "0"));
    nodes.push(svg("text", { x: left, y: height - 6, class: "axis" }, `${duration(last.t - first)} ago`));
    nodes.push(svg("text", { x: left + plotWidth, y: height - 6, class: "axis end" }, clockTime(last.t * 1000)));
    for (const [field, className] of [["completed_per_s", "completed"], ["failed_per_s", "failed"]]) {
      const coordinates = points.map((p) => `${x(p.t).toFixed(1)},${y(p[field]).toFixed(1)}`).join(" ");
      nodes.push(svg("polyline", { points: coordinates, class: `series ${className}` }));
    }
    chart.replaceChildren(...nodes);
  }

  // 1, 2 or 5 times a power of ten, at least `value` (and at least 1 task/s).
  function niceCeiling(value) {
    if (!(value > 1)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  // --- dead letters ----------------------------------------------------------------------------

  async function refreshDead() {
    const path = `/dashboard/api/dead?offset=${state.deadOffset}&limit=${DEAD_PAGE_SIZE}`;
    const { status, body } = await request("GET", path);
    if (status !== 200) return;
    state.deadTotal = body.total;
    if (body.items.length === 0 && body.total > 0 && state.deadOffset > 0) {
      // The page emptied under us (requeued or purged): show the last page that has items.
      state.deadOffset = Math.floor((body.total - 1) / DEAD_PAGE_SIZE) * DEAD_PAGE_SIZE;
      state.again = true;
      return;
    }
    renderDeadPager(body);
    const shown = JSON.stringify([body.offset, body.items]);
    if (shown !== state.deadShown) {
      state.deadShown = shown;
      renderDeadRows(body.items);
    }
  }

  function renderDeadPager(page) {
    setText("dead-total", count(page.total));
    const end = page.offset + page.items.length;
    setText("dead-range", page.total === 0 ? "none" : `${count(page.offset + 1)}–${count(end)} of ${count(page.total)}`);
    byId("dead-prev").disabled = page.offset === 0;
    byId("dead-next").disabled = end >= page.total;
    byId("requeue-all").disabled = page.total === 0;
    byId("purge").disabled = page.total === 0;
  }

  function renderDeadRows(items) {
    const rows = items.map((item) => {
      const idCell = element("td");
      const idLink = element("button", item.task_id, "link mono");
      idLink.type = "button";
      idLink.title = "look this task up";
      idLink.addEventListener("click", () => lookup(item.task_id));
      idCell.appendChild(idLink);
      const error = element("td", item.error, "error");
      const payload = element("td");
      payload.appendChild(element("code", item.payload_excerpt));
      const actions = element("td", null, "action");
      if (!item.task_id) {
        actions.appendChild(element("span", "unreadable: only Purge removes it", "muted"));
      } else if (!state.readOnly) {
        const button = element("button", "Requeue", "requeue");
        button.type = "button";
        button.addEventListener("click", () => requeueOne(item.task_id, button));
        actions.appendChild(button);
      }
      const tr = row([idCell, item.user_id, count(item.attempts), dateTime(item.failed_at_ms), error, payload, actions]);
      tr.dataset.taskId = item.task_id;
      return tr;
    });
    if (rows.length === 0) rows.push(row([element("td", "no dead letters", "muted")]));
    byId("dead-table").replaceChildren(...rows);
  }

  function page(step) {
    const offset = state.deadOffset + step * DEAD_PAGE_SIZE;
    if (offset < 0 || offset >= Math.max(state.deadTotal, 1)) return;
    state.deadOffset = offset;
    pollSoon();
  }

  // --- actions ---------------------------------------------------------------------------------

  function report(message) {
    setText("action-result", message);
  }

  function failure(body, status) {
    return body && body.message ? body.message : `HTTP ${status}`;
  }

  async function requeueOne(taskId, button) {
    button.disabled = true;
    const { status, body } = await request("POST", `/dashboard/api/dead/${encodeURIComponent(taskId)}/requeue`);
    report(status === 200 ? `requeued ${taskId}` : `requeue failed: ${failure(body, status)}`);
    state.deadShown = "";
    pollSoon();
  }

  // Two steps, in the page: the first click asks, "Yes" acts, "Cancel" forgets it.
  function ask(question, action) {
    state.confirmAction = action;
    setText("confirm-text", question);
    byId("confirm").hidden = false;
    byId("confirm-no").focus();
  }

  function closeConfirm() {
    state.confirmAction = null;
    byId("confirm").hidden = true;
  }

  async function requeueAll() {
    const { status, body } = await request("POST", "/dashboard/api/dead/requeue-all");
    report(status === 200 ? `requeued ${count(body.requeued)} tasks` : `requeue all failed: ${failure(body, status)}`);
  }

  async function purge() {
    const { status, body } = await request("POST", "/dashboard/api/dead/purge");
    report(status === 200 ? `purged ${count(body.purged)} dead letters` : `purge failed: ${failure(body, status)}`);
  }

  // --- task lookup -----------------------------------------------------------------------------

  async function lookup(taskId) {
    const id = taskId.trim();
    byId("lookup-input").value = id;
    const result = byId("lookup-result");
    if (!id) {
      result.replaceChildren(element("p", "Enter a task id.", "muted"));
      return;
    }
    const { status, body } = await request("GET", `/dashboard/api/task/${encodeURIComponent(id)}`);
    if (status !== 200) {
      result.replaceChildren(element("p", status === 404 ? `No task ${id} (unknown or expired).` : failure(body, status), "error"));
      return;
    }
    const list = element("dl", null, "facts record");
    for (const [name, value] of Object.entries(body)) {
      list.appendChild(element("dt", name));
      const text = typeof value === "string" ? value : JSON.stringify(value);
      list.appendChild(element("dd", text, name === "status" ? `task-status ${value}` : "mono"));
    }
    result.replaceChildren(list);
  }

  // --- start -----------------------------------------------------------------------------------

  function wire() {
    byId("logout").addEventListener("click", logout);
    byId("dead-prev").addEventListener("click", () => page(-1));
    byId("dead-next").addEventListener("click", () => page(1));
    byId("requeue-all").addEventListener("click", () =>
      ask(`Requeue all ${count(state.deadTotal)} dead letters?`, requeueAll)
    );
    byId("purge").addEventListener("click", () =>
      ask(`Delete all ${count(state.deadTotal)} dead letters for good?`, purge)
    );
    byId("confirm-no").addEventListener("click", closeConfirm);
    byId("confirm-yes").addEventListener("click", async () => {
      const action = state.confirmAction;
      closeConfirm();
      if (action) {
        await action();
        state.deadShown = "";
        pollSoon();
      }
    });
    byId("lookup-form").addEventListener("submit", (event) => {
      event.preventDefault();
      lookup(byId("lookup-input").value);
    });
  }

  async function logout() {
    const { status, body } = await request("POST", "/dashboard/logout");
    if (status === 200) window.location.assign("/dashboard/login");
    else report(`sign out failed: ${failure(body, status)}`);
  }

  async function loadSession() {
    const { status, body } = await request("GET", "/dashboard/api/session");
    if (status !== 200) {
      setStatus(status === 0 ? "server unreachable" : `error: ${failure(body, status)}`, "down");
      if (status !== 401) window.setTimeout(loadSession, 5000);
      return;
    }
    state.csrfToken = body.csrf_token;
    state.readOnly = body.read_only;
    state.pollIntervalMs = Math.max(1, body.poll_interval_s) * 1000;
    document.body.classList.toggle("read-only", state.readOnly);
    for (const node of document.querySelectorAll(".action")) node.hidden = state.readOnly;
    setText("mode", `${state.readOnly ? "read-only · " : ""}access: ${body.auth}`);
    byId("logout").hidden = body.auth !== "cookie";
    schedule(0);
  }

  wire();
  loadSession();
})();
