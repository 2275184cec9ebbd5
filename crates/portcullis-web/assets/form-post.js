// Submits the page's first form (the OAuth 2.0 form_post response) as soon as the document is
// parsed. The visible "Continue" button does the same without JavaScript.
(function () {
  "use strict";
  var submitted = false;
  function go() {
    if (submitted) { return; }
    var form = document.forms[0];
    if (!form) { return; }
    submitted = true;
    // Call the prototype's submit: a field named "submit" would shadow form.submit.
    HTMLFormElement.prototype.submit.call(form);
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", go);
  } else {
    go();
  }
})();
