// The admin portal's progressive enhancement. Every page works without it: forms post, links
// navigate, secrets are on the page. With it: copy buttons, the client id checked while it is
// typed, and the application type presetting the grants and the authentication method.
// Loaded as a file (the CSP allows no inline script).
(function () {
  "use strict";

  function copyButtons() {
    var buttons = document.querySelectorAll("button[data-copy]");
    Array.prototype.forEach.call(buttons, function (b) {
      b.addEventListener("click", function () {
        var el = document.getElementById(b.getAttribute("data-copy"));
        if (!el) { return; }
        var text = el.textContent || "";
        var done = function () {
          var label = b.textContent;
          b.textContent = "Copied";
          b.setAttribute("aria-live", "polite");
          setTimeout(function () { b.textContent = label; }, 1500);
        };
        if (navigator.clipboard && navigator.clipboard.writeText) {
          navigator.clipboard.writeText(text).then(done, function () { selectText(el); });
        } else {
          selectText(el);
        }
      });
    });
  }

  function selectText(el) {
    var range = document.createRange();
    range.selectNodeContents(el);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  function clientIdCheck() {
    var input = document.getElementById("slug");
    var status = document.getElementById("slug-status");
    var preview = document.getElementById("client-id-preview");
    if (!input || !status || !input.getAttribute("data-check-url")) { return; }
    var url = input.getAttribute("data-check-url");
    var timer = null;
    var seq = 0;
    function show(ok, message) {
      status.textContent = message;
      status.className = "hint check-status " + (ok ? "check-ok" : "check-bad");
      input.setAttribute("aria-invalid", ok ? "false" : "true");
    }
    function check() {
      var slug = input.value.trim();
      if (preview) {
        var prefix = preview.textContent.split("$")[0];
        preview.textContent = prefix + "$" + slug;
      }
      if (!slug) { status.textContent = ""; input.removeAttribute("aria-invalid"); return; }
      var mine = ++seq;
      fetch(url + "?slug=" + encodeURIComponent(slug), { credentials: "same-origin", headers: { accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (j) {
          if (mine !== seq || !j) { return; }
          show(j.valid && j.available, j.message);
        })
        .catch(function () { /* the server checks again on submit */ });
    }
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(check, 250);
    });
    if (input.value) { check(); }
  }

  var KINDS = {
    machine: { grants: ["client_credentials"], method: "client_secret_basic" },
    web: { grants: ["authorization_code", "refresh_token"], method: "client_secret_basic" },
    spa: { grants: ["authorization_code", "refresh_token"], method: "none" }
  };

  function kindPresets() {
    var kind = document.getElementById("kind");
    var method = document.getElementById("token_endpoint_auth_method");
    if (!kind || !method) { return; }
    kind.addEventListener("change", function () {
      var preset = KINDS[kind.value];
      if (!preset) { return; }
      var boxes = document.querySelectorAll("input[name=grant_types]");
      Array.prototype.forEach.call(boxes, function (b) { b.checked = preset.grants.indexOf(b.value) >= 0; });
      method.value = preset.method;
    });
  }

  function init() {
    copyButtons();
    clientIdCheck();
    kindPresets();
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
