// The console's only script: refreshes the sections every few seconds and
// sends the operator's actions to the API with the session's CSRF token.
(function () {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const sections = document.getElementById("sections");
  const status = document.getElementById("status");
  const say = (text, bad) => { status.textContent = text; status.className = bad ? "error" : ""; };

  async function refresh() {
    try {
      const r = await fetch("/console/sections", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.reload(); return; }
      if (r.ok) sections.innerHTML = await r.text();
    } catch (e) { say("cannot reach the worker: " + e, true); }
  }

  async function post(path, body) {
    const r = await fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": csrf },
      body: JSON.stringify(body || {}),
    });
    let answer = {};
    try { answer = await r.json(); } catch (e) { /* an empty answer */ }
    if (!r.ok) throw new Error(answer.error || ("HTTP " + r.status));
    return answer;
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    const app = button.dataset.app;
    button.disabled = true;
    try {
      if (action === "pause") {
        const duration = document.getElementById("pause-for").value.trim();
        const reason = document.getElementById("pause-reason").value.trim();
        const body = {};
        if (duration) body.for = duration;
        if (reason) body.reason = reason;
        await post("/api/accounts/" + encodeURIComponent(app) + "/pause", body);
        say("paused " + app);
      } else if (action === "resume") {
        await post("/api/accounts/" + encodeURIComponent(app) + "/resume");
        say("resumed " + app);
      } else if (action === "replay") {
        const done = await post("/api/dead-letters/replay", { ids: [button.dataset.id] });
        say(done.replayed ? "replayed " + done.commandIds.join(", ") : "already gone from the dead letters");
      } else if (action === "replay-all") {
        const done = await post("/api/dead-letters/replay", { all: true, limit: 1000 });
        say("replayed " + done.replayed + " dead letters");
      } else if (action === "sign-out") {
        await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "x-csrf-token": csrf } });
        location.href = "/";
        return;
      }
    } catch (e) {
      say(action + " failed: " + e.message, true);
    } finally {
      button.disabled = false;
    }
    refresh();
  });

  setInterval(refresh, 5000);
})();
