// Live market pages: ask for the page's live part again every few seconds and swap it in
// when the feed has moved on (its version changes). No external code.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.fetch) { return; }
  var every = 3000;
  function url() {
    var u = new URL(window.location.href);
    u.searchParams.set("fragment", "1");
    u.searchParams.set("since", live.getAttribute("data-version") || "");
    return u.toString();
  }
  function refresh() {
    fetch(url(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.status === 200 ? r.text() : null; })  // 204: the feed has not moved
      .then(function (html) {
        if (html === null) { return; }
        var holder = document.createElement("div");
        holder.innerHTML = html;
        var version = holder.querySelector("[data-feed-version]");
        var v = version ? version.getAttribute("data-feed-version") : null;
        if (v !== null && v !== live.getAttribute("data-version")) {
          live.innerHTML = html;
          live.setAttribute("data-version", v);
        }
      })
      .catch(function () {})
      .then(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
