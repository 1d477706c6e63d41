// The job's page, live: follows the job's event stream (a stream token minted by the
// server for this job, renewed from the console when the stream reconnects), appends
// each transition and step report to the timeline, and keeps the header current.
(function () {
  "use strict";
  const live = JSON.parse(document.getElementById("console-live").textContent);
  const timeline = document.getElementById("timeline");
  const banner = document.getElementById("banner");
  const liveState = document.getElementById("live-state");
  let last = live.last_event_id;
  let token = live.token;
  let source = null;
  let delay = 1000;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function utc(iso) {
    return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace(/(Z|[+-]00:00)$/, "") + " UTC" : "—";
  }
  function when(iso) {
    const span = el("span");
    if (!iso) { span.textContent = "—"; return span; }
    span.appendChild(el("time", { datetime: iso }, utc(iso)));
    span.appendChild(document.createTextNode(" "));
    span.appendChild(el("span", { class: "rel" }, "(" + consoleAgo(iso) + ")"));
    return span;
  }
  function setWhen(id, iso) {
    const dd = document.getElementById(id);
    dd.replaceChildren(when(iso));
  }

  function item(msg) {
    const li = el("li", { "data-kind": msg.kind, "data-at": msg.created_at, "data-event-id": String(msg.id) });
    if (msg.actor && msg.actor.indexOf("operator:") === 0) li.className = "operator";
    const head = el("div", { class: "tl-head" });
    head.appendChild(el("span", { class: "tl-kind" }, msg.kind + " · #" + msg.attempt));
    const title = msg.kind === "step"
      ? "step " + msg.step + " " + msg.state
      : (msg.from_status ? msg.from_status + " → " : "created, ") + msg.to_status;
    head.appendChild(el("span", { class: "tl-title" }, title));
    const w = when(msg.created_at); w.className = "tl-when"; head.appendChild(w);
    li.appendChild(head);
    const body = el("div", { class: "tl-body" });
    if (msg.kind === "step") {
      if (msg.detail) body.appendChild(el("pre", { class: "detail" }, msg.detail));
    } else {
      body.appendChild(document.createTextNode("by "));
      body.appendChild(el("b", {}, msg.actor));
      if (msg.reason) {
        body.appendChild(document.createTextNode(": "));
        body.appendChild(el("span", { class: "why" }, msg.reason));
      }
    }
    li.appendChild(body);
    return li;
  }

  function showJob(job) {
    const status = document.getElementById("status");
    status.setAttribute("data-status", job.status);
    status.textContent = job.status;
    const left = Math.max(0, job.max_retries - job.retry_count);
    const attempt = document.getElementById("attempt");
    attempt.replaceChildren(document.createTextNode(job.attempt + " "),
      el("span", { class: "muted" }, "· " + left + " of " + job.max_retries + " retries left"));
    setWhen("claimed", job.claimed_at);
    setWhen("completed", job.completed_at);
    const failure = document.getElementById("failure");
    failure.hidden = job.status !== "failed";
    document.getElementById("failure-reason").textContent = job.failure_reason ? "(" + job.failure_reason + ")" : "";
    document.getElementById("failed-step").textContent = job.failed_step ? "at step " + job.failed_step : "";
    document.getElementById("error").textContent = job.error || "";
    const canRetry = live.retry_from.indexOf(job.status) >= 0;
    const canFail = live.in_flight.indexOf(job.status) >= 0;
    document.getElementById("retry-form").hidden = !canRetry;
    document.getElementById("fail-form").hidden = !canFail;
    const none = document.getElementById("no-actions");
    none.hidden = canRetry || canFail;
    none.querySelector(".status-text").textContent = job.status;
    showProgress(job);
  }

  function showProgress(job) {
    const p = job.progress, section = document.getElementById("progress");
    if (!p || !p.total) { section.hidden = true; return; }
    section.hidden = false;
    document.getElementById("progress-attempt").textContent = job.attempt;
    let text = p.completed + " of " + p.total + " steps done";
    if (p.current) text += ", running " + p.current;
    if (p.eta_seconds !== null && p.eta_seconds !== undefined) text += " · about " + consoleDuration(p.eta_seconds) + " left";
    document.getElementById("progress-summary").textContent = text;
    document.getElementById("progress-bar").style.width = (p.completed / p.total * 100).toFixed(1) + "%";
    const steps = document.getElementById("steps");
    steps.replaceChildren.apply(steps, p.steps.map(function (s) {
      return el("li", { "data-step": s.name, "data-state": s.state }, s.label + " · " + s.state);
    }));
  }

  function onMessage(event) {
    let msg;
    try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (!msg || msg.id <= last) return;
    last = msg.id;
    timeline.appendChild(item(msg));
    if (msg.job) showJob(msg.job);
  }

  function setBanner(down) {
    banner.hidden = !down;
    liveState.textContent = down ? "· reconnecting" : "· live";
    document.body.setAttribute("data-live", down ? "reconnecting" : "live");
  }

  function open() {
    const url = live.stream_url + "?token=" + encodeURIComponent(token) + "&last_event_id=" + last;
    source = new EventSource(url);
    source.addEventListener("open", function () { delay = 1000; setBanner(false); });
    source.addEventListener("transition", onMessage);
    source.addEventListener("step", onMessage);
    source.addEventListener("error", function () {
      // The token is checked when a stream opens and lives 60 s: reconnect ourselves
      // with a fresh one (and the last event shown), not with EventSource's own retry.
      source.close();
      setBanner(true);
      setTimeout(reconnect, delay);
      delay = Math.min(delay * 2, 15000);
    });
  }

  async function reconnect() {
    try {
      const answer = await fetch(live.token_url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (answer.redirected || !answer.ok) {
        banner.textContent = answer.redirected ? "Logged out: log in to the admin again, then reload." : "Live updates lost: reconnecting…";
        if (answer.redirected) { setBanner(true); return; }
        throw new Error("token " + answer.status);
      }
      token = (await answer.json()).token;
      open();
    } catch (e) {
      setTimeout(reconnect, delay);
      delay = Math.min(delay * 2, 15000);
    }
  }

  if (window.EventSource) open();
})();
