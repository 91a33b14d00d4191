// gitfleet status page: live updates and relative times. The page works without this
// file (it then refreshes itself every 10 seconds); with it, a server-sent event says when
// something changed and only <main> is replaced, keeping the scroll position.
"use strict";

(function () {
  const units = [["day", 86400], ["h", 3600], ["min", 60], ["s", 1]];

  function relative(seconds) {
    const ago = seconds >= 0;
    let rest = Math.abs(seconds);
    if (rest < 5) return "just now";
    for (const [unit, size] of units) {
      if (rest >= size) {
        const count = Math.floor(rest / size);
        const word = unit === "day" ? (count === 1 ? " day" : " days") : " " + unit;
        return ago ? count + word + " ago" : "in " + count + word;
      }
    }
    return "just now";
  }

  function refreshTimes(root) {
    const now = Date.now() / 1000;
    for (const element of root.querySelectorAll("time[datetime]")) {
      const at = Date.parse(element.getAttribute("datetime")) / 1000;
      if (!Number.isNaN(at)) element.textContent = relative(now - at);
    }
  }

  const indicator = document.querySelector("header.top .live");
  function setLive(state, text) {
    if (!indicator) return;
    indicator.dataset.state = state;
    indicator.textContent = text;
  }

  let fetching = false;
  let again = false;
  async function reload() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const response = await fetch(window.location.href, { headers: { "Accept": "text/html" } });
      if (response.ok) {
        const next = new DOMParser().parseFromString(await response.text(), "text/html");
        const main = document.querySelector("main");
        const fresh = next.querySelector("main");
        if (main && fresh) {
          main.replaceWith(fresh);
          refreshTimes(fresh);
          document.title = next.title;
        }
      }
    } catch (error) {
      setLive("offline", "reconnecting…");
    } finally {
      fetching = false;
      if (again) { again = false; reload(); }
    }
  }

  refreshTimes(document);
  setInterval(() => refreshTimes(document), 15000);

  // A page kept in the back-forward cache keeps its event stream open unless it is closed
  // here; browsers allow six HTTP/1.1 connections per server, so a few pages visited would
  // leave none for the next page.
  let events = null;
  function listen() {
    if (!("EventSource" in window) || events) return;
    events = new EventSource("/events");
    events.addEventListener("open", () => setLive("live", "live"));
    events.addEventListener("change", reload);
    events.addEventListener("error", () => setLive("offline", "reconnecting…"));
  }
  window.addEventListener("pagehide", () => {
    if (events) { events.close(); events = null; }
  });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) { listen(); reload(); }
  });
  listen();
})();
