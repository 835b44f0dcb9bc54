// keyturn reviewer inbox: live updates (server-sent events), countdowns, and a hint when a denial has no reason.
// Loaded as a file (the Content-Security-Policy forbids inline scripts). The server decides everything.
"use strict";

(function () {
  function duration(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    if (s >= 3600) return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
    if (s >= 60) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    return s + "s";
  }

  function tick() {
    var now = Date.now() / 1000;
    document.querySelectorAll("time[data-expires]").forEach(function (el) {
      var expires = Number(el.dataset.expires);
      if (!expires) return;
      var left = expires - now;
      el.textContent = left > 0 ? duration(left) + " left" : "expired";
      el.classList.toggle("expired", left <= 0);
    });
  }

  var leaving = false; // a form is being submitted: the page is about to go, leave it alone

  // A denial needs a reason: say so before the round trip (the server checks it anyway).
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!(form instanceof HTMLFormElement)) return;
    var reason = form.classList.contains("vote") ? form.querySelector("textarea[name=reason]") : null;
    if (ev.submitter && ev.submitter.value === "deny" && reason && !reason.value.trim()) {
      ev.preventDefault();
      var error = form.querySelector(".field-error");
      if (error) error.hidden = false;
      reason.setAttribute("aria-invalid", "true");
      reason.focus();
      return;
    }
    leaving = true;
  });

  function live(list) {
    var status = document.getElementById("live-status");
    var busy = false;
    var again = false;

    function say(text, state) {
      if (!status) return;
      status.textContent = text;
      status.classList.toggle("on", state === "on");
      status.classList.toggle("off", state === "off");
    }

    function closeCard(card) {
      if (card.classList.contains("closed")) return;
      card.classList.add("closed");
      var form = card.querySelector("form.vote, p.voted");
      var note = document.createElement("p");
      note.className = "closed-note";
      note.append("No longer pending. ");
      var link = document.createElement("a");
      link.href = "/inbox/requests/" + encodeURIComponent(card.dataset.id);
      link.textContent = "See what happened";
      note.append(link);
      if (form) form.replaceWith(note); else card.append(note);
      var expires = card.querySelector("time[data-expires]");
      if (expires) expires.removeAttribute("data-expires");
    }

    function merge(fresh) {
      var seen = new Set();
      var anchor = list.querySelector("article.request");
      var added = 0;
      fresh.querySelectorAll("article.request").forEach(function (card) {
        seen.add(card.id);
        var mine = document.getElementById(card.id);
        if (mine) {
          if (mine.dataset.version !== card.dataset.version) {
            var part = mine.querySelector("[data-part=status]");
            var next = card.querySelector("[data-part=status]");
            if (part && next) part.replaceWith(document.importNode(next, true));
            mine.dataset.version = card.dataset.version;
          }
          return;
        }
        list.insertBefore(document.importNode(card, true), anchor);
        added += 1;
      });
      list.querySelectorAll("article.request").forEach(function (card) {
        if (!seen.has(card.id)) closeCard(card);
      });
      var empty = list.querySelector(".empty");
      if (empty) empty.hidden = list.querySelectorAll("article.request:not(.closed)").length > 0;
      tick();
      return added;
    }

    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(list.dataset.fragment, { credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" } })
        .then(function (resp) {
          if (resp.status === 401) { if (!leaving) window.location.reload(); return null; }
          if (!resp.ok) throw new Error("HTTP " + resp.status);
          return resp.text();
        })
        .then(function (html) {
          if (html === null) return;
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.getElementById("requests");
          if (!fresh) throw new Error("unexpected answer");
          var added = merge(fresh);
          say("Live · updated " + new Date().toLocaleTimeString() +
              (added ? " · " + added + " new request" + (added === 1 ? "" : "s") : ""), "on");
        })
        .catch(function (err) { say("Live updates paused (" + err.message + "); reload the page.", "off"); })
        .finally(function () {
          busy = false;
          if (again) { again = false; refresh(); }
        });
    }

    if (!window.EventSource) { say("Live updates need a newer browser; reload to refresh.", "off"); return; }
    var opened = false;
    var source = new EventSource(list.dataset.events);
    source.addEventListener("open", function () {
      if (opened) refresh(); // a reconnect may have missed something
      else say("Live · new requests appear here as they arrive", "on");
      opened = true;
    });
    source.addEventListener("message", refresh);
    source.addEventListener("signed-out", function () {
      source.close();
      if (!leaving) window.location.assign("/login?next=%2Finbox");
    });
    source.addEventListener("error", function () {
      if (leaving) return;
      if (source.readyState === EventSource.CLOSED) refresh(); // e.g. signed out: the list answers 401
      else say("Live · reconnecting…", "off");
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function start() {
    tick();
    window.setInterval(tick, 1000);
    var list = document.getElementById("requests");
    if (list && list.dataset.live) live(list);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
