// Live updates without reloading: each element with data-poll is refreshed
// from its URL (an HTML fragment of the dashboard) every data-every
// milliseconds (1000 by default). A failed fetch (the dashboard restarting)
// is tried again at the next tick.
"use strict";

function poll(element) {
  const every = Number(element.dataset.every || 1000);
  const tick = async () => {
    try {
      const reply = await fetch(element.dataset.poll, {credentials: "same-origin", cache: "no-store"});
      if (reply.ok) {
        element.innerHTML = await reply.text();
        element.dataset.updated = String(Date.now());
      }
    } catch (error) {
      // Not reachable this time: the next tick tries again.
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}

document.querySelectorAll("[data-poll]").forEach(poll);
