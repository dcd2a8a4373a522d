(function () {
  "use strict";
  var body = document.body;
  function val(id) {
    var el = document.getElementById(id);
    return el ? el.value : "";
  }
  function applyFilters() {
    var c = val("f-correct"), t = val("f-tool"), g = val("f-cat");
    var q = val("f-search").trim().toLowerCase();
    var shown = 0;
    var items = document.querySelectorAll("[data-item]");
    for (var i = 0; i < items.length; i++) {
      var el = items[i], d = el.dataset;
      var ok = (!c || d.correct === c) && (!t || d.tool === t) && (!g || d.cat === g) &&
        (!q || (d.search || "").indexOf(q) >= 0);
      el.hidden = !ok;
      if (ok && el.tagName === "TR") shown++;
    }
    var n = document.getElementById("shown-count");
    if (n) n.textContent = String(shown);
    body.dataset.shown = String(shown);
  }
  var controls = document.querySelectorAll(".filters select, .filters input");
  for (var i = 0; i < controls.length; i++) {
    controls[i].addEventListener("change", applyFilters);
    controls[i].addEventListener("input", applyFilters);
  }
  var reset = document.getElementById("f-reset");
  if (reset) reset.addEventListener("click", function () {
    for (var j = 0; j < controls.length; j++) controls[j].value = "";
    applyFilters();
  });
  var rows = document.querySelectorAll("tr[data-target]");
  for (var k = 0; k < rows.length; k++) {
    rows[k].addEventListener("click", function () {
      var target = document.getElementById(this.dataset.target);
      if (target) target.scrollIntoView();
    });
  }
  function countImages() {
    var imgs = document.images, loaded = 0, broken = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) loaded++; else broken++;
    }
    body.dataset.imagesTotal = String(imgs.length);
    body.dataset.imagesLoaded = String(loaded);
    var banner = document.getElementById("image-warning");
    if (banner && broken > 0) {
      banner.textContent = broken + " of " + imgs.length + " images could not be shown.";
      banner.hidden = false;
    }
  }
  // filters can be preset from the query string: report.html?correct=wrong&tool=yes&cat=...&q=...
  var params = new URLSearchParams(window.location.search);
  var preset = { "f-correct": "correct", "f-tool": "tool", "f-cat": "cat", "f-search": "q" };
  for (var id in preset) {
    var v = params.get(preset[id]), el = document.getElementById(id);
    if (v !== null && el) el.value = v;
  }
  applyFilters();
  if (document.readyState === "complete") countImages();
  else window.addEventListener("load", countImages);
})();
