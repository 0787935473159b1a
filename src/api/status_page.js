// The status page: lists the clusters once, then follows the event stream. The stream is read
// with fetch rather than EventSource so that an API token travels in a header, never in a URL.
"use strict";

(function () {
  const TOKEN_KEY = "proxmoxer.token";
  const RANK = { unhealthy: 0, unknown: 1, degraded: 2, healthy: 3 };
  // Events carry no last_checked_at changes, so the list is read again now and then to keep
  // "checked … ago" true.
  const RELIST_MS = 30000;
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 30000;

  const clusters = new Map();
  let lastEventId = null;
  // Server time minus local time, from the Date header, so "ago" survives a wrong local clock.
  let clockSkewMs = 0;
  let streamAbort = null;
  let retryMs = RETRY_MIN_MS;
  let renderQueued = false;
  let generation = 0;
  // While the page waits for a token it shows nothing but the form.
  let locked = false;

  const $ = (id) => document.getElementById(id);

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    const t = token();
    if (t) h.Authorization = "Bearer " + t;
    return h;
  }

  class Unauthorized extends Error {}

  async function api(path, init) {
    const response = await fetch(path, init);
    if (response.status === 401) throw new Unauthorized("the API token was refused");
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        const body = await response.json();
        if (body && body.message) message = body.message;
      } catch (_) {
        // Not the API's JSON error shape; the status line says enough.
      }
      throw new Error(message);
    }
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) clockSkewMs = date - Date.now();
    return response;
  }

  function setConnection(state, text) {
    const el = $("connection");
    el.dataset.state = state;
    el.textContent = text;
  }

  function showProblem(text) {
    const el = $("problem");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function askForToken(refused) {
    stop();
    locked = true;
    clusters.clear();
    setConnection("locked", "API token needed");
    $("clusters").hidden = true;
    $("empty").hidden = true;
    showProblem("");
    const error = $("login-error");
    error.textContent = refused ? "That token was refused. Try another." : "";
    error.hidden = !refused;
    $("login").hidden = false;
    $("token").focus();
  }

  function stop() {
    generation += 1;
    if (streamAbort) streamAbort.abort();
    streamAbort = null;
  }

  function onUnauthorized() {
    const hadToken = token() !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(hadToken);
  }

  // A list answers as of some moment while it is in flight; events arriving meanwhile may be
  // older or newer than that. Holding them back and applying them in order over the list
  // ends on the newest state either way.
  let listing = null;
  let held = null;
  // A list asked for while one is in flight may need a newer answer than that one gives.
  let listAgain = false;

  function list() {
    if (listing) {
      listAgain = true;
      return listing;
    }
    held = [];
    listing = (async () => {
      try {
        const response = await api("/api/v1/clusters", { headers: headers(), cache: "no-store" });
        const body = await response.json();
        clusters.clear();
        for (const cluster of body.clusters || []) clusters.set(cluster.id, cluster);
      } finally {
        const events = held;
        held = null;
        listing = null;
        for (const event of events) apply(event);
        queueRender();
        if (listAgain) {
          listAgain = false;
          list().catch(handleFailure);
        }
      }
    })();
    return listing;
  }

  function apply(event) {
    const data = event.data;
    switch (event.name) {
      case "cluster.registered":
      case "cluster.updated":
        clusters.set(data.id, data);
        break;
      case "cluster.deregistered":
        clusters.delete(data.id);
        break;
    }
  }

  function dispatch(frame) {
    if (frame.id !== null) lastEventId = frame.id;
    if (frame.event === "resync") {
      // Events were lost: what we hold may be wrong. The stream may end after this.
      list().catch(handleFailure);
      return;
    }
    let data = null;
    try {
      data = frame.data ? JSON.parse(frame.data) : null;
    } catch (_) {
      return;
    }
    if (!data || typeof data.id !== "string") return;
    const event = { name: frame.event, data };
    if (held) held.push(event);
    else apply(event);
    queueRender();
  }

  // Splits the text/event-stream body into frames: lines of `field: value`, ended by a blank
  // line; lines starting with `:` are comments (the keep-alives).
  function parser() {
    let buffer = "";
    let frame = { id: null, event: "", data: null };
    return function feed(text) {
      buffer += text;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) !== -1) {
        const line = buffer.slice(0, newline);
        const width = buffer.startsWith("\r\n", newline) ? 2 : 1;
        // A lone \r at the very end may be half of \r\n: wait for the next chunk.
        if (width === 1 && buffer[newline] === "\r" && newline === buffer.length - 1) break;
        buffer = buffer.slice(newline + width);
        if (line === "") {
          dispatch(frame);
          frame = { id: null, event: "", data: null };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "id") frame.id = value;
        else if (field === "event") frame.event = value;
        else if (field === "data") frame.data = frame.data === null ? value : frame.data + "\n" + value;
      }
    };
  }

  async function follow(mine) {
    const abort = new AbortController();
    streamAbort = abort;
    const extra = { Accept: "text/event-stream" };
    if (lastEventId !== null) extra["Last-Event-ID"] = lastEventId;
    const response = await api("/api/v1/events", {
      headers: headers(extra),
      cache: "no-store",
      signal: abort.signal,
    });
    try {
      // Subscribed first, listed second: nothing changes unseen between the two.
      await list();
      if (mine !== generation) return;
      setConnection("live", "live");
      showProblem("");
      retryMs = RETRY_MIN_MS;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const feed = parser();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(decoder.decode(value, { stream: true }));
      }
    } finally {
      // Whatever ended this attempt, its connection goes with it.
      abort.abort();
    }
  }

  function handleFailure(error) {
    if (error instanceof Unauthorized) {
      onUnauthorized();
      return true;
    }
    if (error && error.name === "AbortError") return true;
    showProblem("Cannot reach proxmoxer: " + (error && error.message ? error.message : error));
    return false;
  }

  async function run() {
    const mine = generation;
    while (mine === generation) {
      setConnection("connecting", "connecting…");
      try {
        await follow(mine);
      } catch (error) {
        if (handleFailure(error)) return;
      }
      if (mine !== generation) return;
      setConnection("reconnecting", "reconnecting in " + Math.round(retryMs / 1000) + " s…");
      await new Promise((resolve) => setTimeout(resolve, retryMs));
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    }
  }

  function start() {
    stop();
    locked = false;
    $("login").hidden = true;
    run();
  }

  // --- rendering -------------------------------------------------------------------------

  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    setTimeout(() => {
      renderQueued = false;
      render();
    }, 0);
  }

  function byWorstFirst(a, b) {
    const ra = RANK[a.status] ?? 1;
    const rb = RANK[b.status] ?? 1;
    if (ra !== rb) return ra - rb;
    return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function cell(label, className, text) {
    const td = el("td", className, text);
    td.dataset.label = label;
    return td;
  }

  function ago(timestamp) {
    if (!timestamp) return "never";
    const then = Date.parse(timestamp);
    if (Number.isNaN(then)) return "—";
    const seconds = Math.max(0, Math.round((Date.now() + clockSkewMs - then) / 1000));
    if (seconds < 5) return "just now";
    if (seconds < 90) return seconds + " s ago";
    const minutes = Math.round(seconds / 60);
    if (minutes < 90) return minutes + " min ago";
    const hours = Math.round(minutes / 60);
    if (hours < 48) return hours + " h ago";
    return Math.round(hours / 24) + " d ago";
  }

  function memberChip(member, activeEndpoint) {
    const chip = el("li", "member");
    chip.append(el("span", "member-name", member.name));
    const notes = [];
    if (activeEndpoint && member.endpoint === activeEndpoint) {
      chip.classList.add("active");
      notes.push("answering");
    }
    if (member.online === false) {
      chip.classList.add("offline");
      notes.push("offline");
    } else if (member.reachable === false) {
      chip.classList.add("unreachable");
      notes.push("unreachable");
    }
    if (notes.length) chip.append(" ", el("span", "note", "· " + notes.join(", ")));
    if (member.last_error) chip.title = member.last_error;
    return chip;
  }

  function row(cluster) {
    const tr = el("tr");
    tr.dataset.id = cluster.id;
    tr.dataset.name = cluster.name;
    tr.dataset.status = cluster.status;

    const name = cell("Cluster", "name");
    name.append(el("span", null, cluster.name));
    name.title = cluster.api_endpoint || "";

    const status = cell("Status", "status");
    const badge = el("span", "badge " + cluster.status);
    badge.append(el("span", "shape"), el("span", "label", cluster.status));
    status.append(badge);

    const reason = cell("Reason", "reason");
    const why = el("div");
    why.append(el("code", null, cluster.status_reason || "—"));
    if (cluster.last_error) why.append(el("span", "error", cluster.last_error));
    reason.append(why);

    const nodes = cell("Nodes", "nodes");
    const online = cluster.nodes_online ?? "?";
    const total = cluster.node_count ?? "?";
    nodes.textContent = online + "/" + total + " online";

    const members = cell("Members", "members");
    const ul = el("ul");
    for (const member of cluster.members || []) ul.append(memberChip(member, cluster.active_endpoint));
    if (!ul.childElementCount) ul.append(el("li", "none", "—"));
    members.append(ul);

    const version = cell("Version", "version", cluster.proxmox_version || "—");

    const checked = cell("Checked", "checked");
    const time = el("time", null, ago(cluster.last_checked_at));
    if (cluster.last_checked_at) {
      time.dateTime = cluster.last_checked_at;
      time.title = cluster.last_checked_at;
    }
    checked.append(time);

    tr.append(name, status, reason, nodes, members, version, checked);
    return tr;
  }

  function render() {
    if (locked) {
      $("clusters").hidden = true;
      $("empty").hidden = true;
      $("summary").textContent = "";
      return;
    }
    const sorted = Array.from(clusters.values()).sort(byWorstFirst);
    $("clusters").querySelector("tbody").replaceChildren(...sorted.map(row));
    $("clusters").hidden = sorted.length === 0;
    $("empty").hidden = sorted.length !== 0;

    const counts = {};
    for (const c of sorted) counts[c.status] = (counts[c.status] || 0) + 1;
    const parts = Object.keys(RANK)
      .filter((status) => counts[status])
      .map((status) => counts[status] + " " + status);
    $("summary").textContent = parts.length ? parts.join(" · ") : "no clusters";
    const worst = sorted.length ? sorted[0].status : null;
    document.title =
      worst && worst !== "healthy" ? counts[worst] + " " + worst + " — proxmoxer" : "proxmoxer";
  }

  // --- start ---------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      start();
    });
    // Keeps "checked … ago" moving between events.
    setInterval(queueRender, 5000);
    setInterval(() => {
      if (streamAbort && $("connection").dataset.state === "live") list().catch(handleFailure);
    }, RELIST_MS);
    start();
  });
})();
