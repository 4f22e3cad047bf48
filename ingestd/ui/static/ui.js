// ingestd's web page, live: the page's live region (the element with data-live="<fragment URL>") is fetched again
// every data-live-seconds seconds while the tab is shown, and swapped in. Plain fetch, no library, nothing from
// elsewhere; the page works without it (the overview reloads itself, <noscript>).
//
// What it did is visible on the region (for people and for tests): data-updated (ISO time of the last swap),
// data-live-state (ok | lost | login | paused) and the text of #live-status ("updated HH:MM:SS",
// "connection lost", "log in again").
(function () {
  "use strict";
  var region = document.querySelector("[data-live]");
  if (!region) {
    return;
  }
  var url = region.getAttribute("data-live");
  var seconds = Math.max(1, Number(region.getAttribute("data-live-seconds")) || 5);
  var status = document.getElementById("live-status");
  var timer = null;
  var busy = false;
  var stopped = false;
  var wait = seconds * 1000;
  var shown = null; // the fragment last swapped in: the same again is not swapped (a selection stays)

  function two(number) {
    return (number < 10 ? "0" : "") + number;
  }

  // "updated ..." every few seconds is not announced to a screen reader; a lost connection or login is.
  function announce(on) {
    if (status && on) {
      status.setAttribute("role", "alert");
    } else if (status) {
      status.removeAttribute("role");
    }
  }

  function say(text, state) {
    region.setAttribute("data-live-state", state);
    if (status) {
      announce((state === "lost" || state === "login") && status.textContent !== text);
      status.textContent = text;
    }
  }

  function loginAgain() {
    stopped = true;
    region.setAttribute("data-live-state", "login");
    if (status) {
      announce(true);
      status.textContent = "Your session has ended: ";
      var link = document.createElement("a");
      link.href = "/ui/login";
      link.textContent = "log in again";
      status.appendChild(link);
    }
  }

  function schedule() {
    if (!stopped && timer === null && document.visibilityState === "visible") {
      timer = window.setTimeout(refresh, wait);
    }
  }

  function refresh() {
    timer = null;
    if (stopped || busy || document.visibilityState !== "visible") {
      return;
    }
    busy = true;
    var started = Date.now();
    fetch(url, { credentials: "same-origin", cache: "no-store", redirect: "manual", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (response.status === 401 || response.status === 403 || response.type === "opaqueredirect") {
          loginAgain();
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text().then(function (html) {
          if (html !== shown) {
            region.innerHTML = html;
            shown = html;
          }
          var now = new Date();
          region.setAttribute("data-updated", now.toISOString());
          var state = document.visibilityState === "visible" ? "ok" : "paused";
          say("updated " + two(now.getHours()) + ":" + two(now.getMinutes()) + ":" + two(now.getSeconds()), state);
        });
      })
      .catch(function () {
        say("connection lost: trying again", "lost");
      })
      .then(function () {
        busy = false;
        // A large journal makes a fragment slow to build: ask at most 1/20 of the time (5% of the daemon's CPU).
        wait = Math.max(seconds * 1000, 20 * (Date.now() - started));
        schedule();
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") {
      refresh(); // at once: what was shown may be old
    } else {
      if (timer !== null) {
        window.clearTimeout(timer);
        timer = null;
      }
      if (!stopped) {
        region.setAttribute("data-live-state", "paused");
      }
    }
  });
  region.setAttribute("data-live-state", "ok");
  schedule();
})();
