// Keeps the open page current without a reload: the server sends an event `change`
// whenever a job changes state (Server-Sent Events, /dashboard/events); the page then
// fetches itself and swaps in its live regions (the elements marked `data-live`). When
// events keep failing, it falls back to fetching the page every few seconds.
(function () {
  "use strict";
  var job = document.body.getAttribute("data-job") || "";
  if (!document.querySelector("[data-live]")) return;
  var status = document.getElementById("live-status");
  var pending = false, last = 0, timer = null, failures = 0, polling = null;
  var MIN_GAP = 1000, POLL_EVERY = 4000;

  function say(text) { if (status) status.textContent = text; }

  function refresh() {
    timer = null;
    if (pending) { schedule(true); return; }
    pending = true;
    last = Date.now();
    fetch(location.href, { credentials: "same-origin", headers: { "X-Dashboard-Refresh": "1" } })
      .then(function (r) {
        if (r.redirected && /\/dashboard\/login/.test(r.url)) { location.href = r.url; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (!html) return;
        var next = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (region) {
          // A list with selected check boxes stays as it is until the action is taken.
          if (region.hasAttribute("data-live-skip-when-selected") &&
              document.querySelector("input[type=checkbox][form=bulk]:checked")) return;
          var fresh = region.id && next.getElementById(region.id);
          if (fresh && fresh.innerHTML !== region.innerHTML) {
            var focused = document.activeElement && region.contains(document.activeElement);
            region.innerHTML = fresh.innerHTML;
            if (focused) region.setAttribute("tabindex", "-1"), region.focus();
          }
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next event or poll tries again */ })
      .finally(function () { pending = false; });
  }

  function schedule(soon) {
    if (timer) return;
    var wait = Math.max(0, MIN_GAP - (Date.now() - last));
    timer = setTimeout(refresh, soon ? wait : wait);
  }

  function poll() {
    if (polling) return;
    say("Live updates are not reaching this page; refreshing every few seconds instead.");
    document.body.setAttribute("data-live-mode", "polling");
    polling = setInterval(refresh, POLL_EVERY);
  }

  if (!window.EventSource) { poll(); return; }
  var events = new EventSource("/dashboard/events" + (job ? "?job=" + encodeURIComponent(job) : ""));
  events.addEventListener("hello", function () {
    failures = 0;
    document.body.setAttribute("data-live-mode", "events");
    say("");
  });
  events.addEventListener("change", function (e) {
    var data = {};
    try { data = JSON.parse(e.data); } catch (_) { /* a change all the same */ }
    // The job on screen changed: at once; any other change: at most once a second.
    if (job && data.id === job) { if (timer) { clearTimeout(timer); timer = null; } refresh(); }
    else schedule(false);
  });
  events.onerror = function () {
    failures += 1;
    // EventSource reconnects by itself; after repeated failures (or when it gave up), poll.
    if (failures >= 3 || events.readyState === EventSource.CLOSED) {
      events.close();
      poll();
    }
  };
})();
