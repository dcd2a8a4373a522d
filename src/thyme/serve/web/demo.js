// The web demo of `thyme serve` (thyme/serve/demo.py): one request to this server's own
// /v1/chat/completions with stream: true, shown as it streams.
// Model and sandbox text is hostile: it is written with textContent only, and only data:image/
// URLs the server produced are shown as images (the page's CSP allows nothing else).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const form = $("ask-form"), fileInput = $("image"), question = $("question"), keyInput = $("api-key");
  const askButton = $("ask"), stopButton = $("stop"), statusLine = $("status"), errorBox = $("error");
  const figure = $("input-figure"), inputImage = $("input-image"), overlay = $("crops");
  const answerBox = $("answer-box"), answer = $("answer"), stopReason = $("stop-reason"), log = $("log");
  let imageUrl = null, controller = null, reasoning = null, steps = 0;

  const isDataImage = (u) => typeof u === "string" && u.startsWith("data:image/");

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    imageUrl = null;
    figure.hidden = true;
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      if (!isDataImage(reader.result)) return showError("That file is not an image.");
      imageUrl = reader.result;
      inputImage.src = imageUrl;
      figure.hidden = false;
      clearCrops();
    };
    reader.onerror = () => showError("Could not read the file.");
    reader.readAsDataURL(file);
  });

  // The overlay uses the input image's pixels as its coordinates (crop boxes are in input pixels).
  function setOverlaySize(size) {
    const [w, h] = size || [inputImage.naturalWidth, inputImage.naturalHeight];
    if (w > 0 && h > 0) overlay.setAttribute("viewBox", `0 0 ${w} ${h}`);
    return [w, h];
  }
  inputImage.addEventListener("load", () => setOverlaySize(null));

  function clearCrops() {
    overlay.replaceChildren();
  }

  function drawCrops(crops, number, size) {
    const [w, h] = setOverlaySize(size);
    const fontSize = Math.max(12, Math.round(Math.max(w, h) / 28));
    for (const c of crops || []) {
      const box = (c && c.box) || [];
      if (box.length !== 4 || !box.every(Number.isFinite)) continue;
      const rect = (b, cls) => {
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("class", cls);
        r.setAttribute("x", b[0]);
        r.setAttribute("y", b[1]);
        r.setAttribute("width", Math.max(0, b[2] - b[0]));
        r.setAttribute("height", Math.max(0, b[3] - b[1]));
        r.setAttribute("vector-effect", "non-scaling-stroke");
        r.dataset.step = String(number);
        return r;
      };
      if (Array.isArray(c.requested) && c.requested.length === 4 && c.requested.every(Number.isFinite)) {
        overlay.append(rect(c.requested, "requested"));
      }
      overlay.append(rect(box, "crop"));
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("class", "label");
      label.setAttribute("x", box[0] + fontSize * 0.3);
      label.setAttribute("y", box[1] + fontSize);
      label.setAttribute("font-size", fontSize);
      label.textContent = String(number);
      overlay.append(label);
    }
  }

  function appendReasoning(text) {
    if (!reasoning) {
      const item = el("li", "reasoning");
      reasoning = el("pre");
      item.append(reasoning);
      log.append(item);
    }
    reasoning.append(document.createTextNode(text));
  }

  function addStep(event) {
    steps += 1;
    reasoning = null; // the model's next text goes below this step
    const item = el("li", "step");
    item.append(el("h3", null, `Code block ${steps}: sandbox output`));
    if (event.code) item.append(el("pre", "code", event.code));
    const printed = String(event.text || "").replace(/<\/?sandbox_output>/g, "").trim();
    if (printed) item.append(el("pre", "output", printed));
    const images = el("div", "images");
    (event.images || []).filter(isDataImage).forEach((src, i) => {
      const img = el("img");
      img.alt = `image ${i + 1} the code of block ${steps} produced`;
      img.src = src;
      images.append(img);
    });
    if (images.childElementCount) item.append(images);
    log.append(item);
    drawCrops(event.crops, steps, event.input_size);
  }

  function finish(done) {
    answerBox.hidden = false;
    answer.textContent = done.answer == null ? "(no answer)" : String(done.answer);
    stopReason.textContent = `stop reason: ${done.stop_reason}`;
    // the whole trajectory's crops, with the sandbox's repairs applied, replace the streamed ones
    const rounds = (done.rounds || []).filter((r) => r.output !== null || r.ok !== null);
    if (rounds.length) {
      clearCrops();
      rounds.forEach((r, i) => drawCrops(r.crops, i + 1, done.input_size));
    }
  }

  function onChunk(chunk) {
    if (chunk.error) return showError(`Error: ${chunk.error.message || chunk.error.type}`);
    const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
    const event = chunk.thyme;
    if (event && event.event === "done") return finish(event);
    if (event && event.event === "sandbox_output") return addStep(event); // its text (content: full) is in the step
    const text = delta.reasoning_content || delta.content;
    if (text) appendReasoning(text);
  }

  // Server-sent events: "data: {json}" lines, events separated by a blank line, then "data: [DONE]".
  async function readEvents(body) {
    const reader = body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const lines = buffer.slice(0, cut).split("\n");
        buffer = buffer.slice(cut + 2);
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return true;
        onChunk(JSON.parse(data));
      }
    }
  }

  async function api(path, options) {
    const headers = Object.assign({}, options.headers);
    const key = keyInput.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = await response.json();
        if (body && body.error && body.error.message) message += `: ${body.error.message}`;
      } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    return response;
  }

  function reset() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    answerBox.hidden = true;
    answer.textContent = stopReason.textContent = "";
    log.replaceChildren();
    clearCrops();
    reasoning = null;
    steps = 0;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!imageUrl) return showError("Choose an image first.");
    reset();
    controller = new AbortController();
    askButton.disabled = true;
    stopButton.disabled = false;
    statusLine.textContent = "Thinking…";
    try {
      const models = await (await api("/v1/models", { signal: controller.signal })).json();
      const model = (models.data && models.data[0] && models.data[0].id) || "thyme";
      const content = [{ type: "image_url", image_url: { url: imageUrl } }, { type: "text", text: question.value }];
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model, stream: true, messages: [{ role: "user", content }] }),
        signal: controller.signal,
      });
      const complete = await readEvents(response.body);
      statusLine.textContent = complete ? "Done." : "";
      if (!complete) showError("The server closed the stream before the end.");
    } catch (err) {
      statusLine.textContent = "";
      showError(err.name === "AbortError" ? "Stopped." : `Error: ${err.message}`);
    } finally {
      askButton.disabled = false;
      stopButton.disabled = true;
      controller = null;
    }
  });

  stopButton.addEventListener("click", () => controller && controller.abort());
})();
