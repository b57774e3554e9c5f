// AICRL web page. Plain JavaScript, no build step, no external requests.
// Every caption and user text is put in the page with textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const state = {
    file: null,        // the chosen File/Blob
    url: null,         // its object URL (preview)
    result: null,      // the last /api/captions answer
    variants: null,    // {file, style, result, index}: the captions "Another caption" steps through
    pinned: null,      // index of the word whose attention is pinned by a click
    shown: null,       // index of the word whose attention is drawn
    info: null,        // /api/info
    maxBytes: 20 * 1024 * 1024,
    busy: false,
    searched: false,
  };

  // ---------- helpers ----------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setStatus(node, message, isError = false) {
    node.textContent = message || "";
    node.classList.toggle("error", Boolean(isError));
  }

  async function api(url, options = {}) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      throw new Error("Cannot reach the server. Is `aicrl serve` still running?");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : `Request failed (HTTP ${response.status}).`;
      throw new Error(detail);
    }
    return body;
  }

  function formatNumber(value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    if (Math.abs(value) < 10) return value.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
    return value.toFixed(1);
  }

  function prettyKey(key) {
    const text = String(key).replace(/_/g, " ");
    return /^[a-z]/.test(text) ? text.charAt(0).toUpperCase() + text.slice(1) : text;
  }

  function formatBytes(bytes) {
    return `${Math.round(bytes / (1024 * 1024))} MB`;
  }

  // ---------- tabs ----------

  const tabs = ["home", "query", "info"];

  function selectTab(name, focus = false) {
    for (const tab of tabs) {
      const button = $(`tab-${tab}`);
      const active = tab === name;
      button.setAttribute("aria-selected", String(active));
      button.tabIndex = active ? 0 : -1;
      $(`panel-${tab}`).hidden = !active;
      if (active && focus) button.focus();
    }
    if (location.hash !== `#${name}`) history.replaceState(null, "", name === "home" ? location.pathname : `#${name}`);
    if (name === "query" && !state.searched) runSearch("");
    if (name === "info") loadInfo(); // refresh: latency and gallery size change
    if (name === "home") redrawAttention();
  }

  function setupTabs() {
    for (const tab of tabs) {
      const button = $(`tab-${tab}`);
      button.addEventListener("click", () => selectTab(tab));
      button.addEventListener("keydown", (event) => {
        const i = tabs.indexOf(tab);
        let next = null;
        if (event.key === "ArrowRight") next = tabs[(i + 1) % tabs.length];
        else if (event.key === "ArrowLeft") next = tabs[(i + tabs.length - 1) % tabs.length];
        else if (event.key === "Home") next = tabs[0];
        else if (event.key === "End") next = tabs[tabs.length - 1];
        if (next) {
          event.preventDefault();
          selectTab(next, true);
        }
      });
    }
    const fromHash = () => {
      const name = location.hash.replace("#", "");
      return tabs.includes(name) ? name : "home";
    };
    window.addEventListener("hashchange", () => selectTab(fromHash()));
    selectTab(fromHash());
  }

  // ---------- choosing an image ----------

  function chooseFile(file) {
    const status = $("status");
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(status, `"${file.name || "This file"}" is not an image (${file.type}). Choose a photo.`, true);
      return;
    }
    if (file.size === 0) {
      setStatus(status, "This file is empty. Choose a photo.", true);
      return;
    }
    if (file.size > state.maxBytes) {
      setStatus(status, `This file is larger than the limit of ${formatBytes(state.maxBytes)}.`, true);
      return;
    }
    clearResult();
    if (state.url) URL.revokeObjectURL(state.url);
    state.file = file;
    state.url = URL.createObjectURL(file);
    const preview = $("preview");
    preview.src = state.url;
    preview.alt = `The photo to caption${file.name ? ` (${file.name})` : ""}`;
    $("preview-figure").hidden = false;
    $("placeholder").hidden = true;
    $("pick-again").hidden = false;
    $("captionize").disabled = false;
    $("another").disabled = false;
    setStatus(status, "Ready: press Captionize.");
    $("captionize").focus(); // the next step, for keyboard and screen reader users
  }

  // The browser could not show the chosen file: not an image (or a broken one). TIFF is the
  // exception: the server reads it, browsers do not show it.
  function previewFailed() {
    const file = state.file;
    if (!file || !state.url) return;
    if (/tiff?$/i.test(file.type) || /\.tiff?$/i.test(file.name || "")) {
      $("preview-figure").hidden = true;
      $("placeholder").hidden = false;
      setStatus($("status"), `"${file.name}" is a TIFF: no preview in the browser, but it can be captioned.`);
      return;
    }
    const name = file.name || "This file";
    refresh(false);
    setStatus($("status"), `"${name}" is not an image this page can read. Choose a photo (JPEG, PNG, GIF, WebP, BMP).`, true);
  }

  function setupInput() {
    const input = $("file");
    const open = () => input.click();
    $("pick").addEventListener("click", open);
    $("pick-again").addEventListener("click", open);
    input.addEventListener("change", () => {
      if (input.files && input.files[0]) chooseFile(input.files[0]);
    });

    const zone = $("dropzone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      const file = event.dataTransfer.files && event.dataTransfer.files[0];
      if (file) chooseFile(file);
      else setStatus($("status"), "Drop an image file.", true);
    });
    // Do not let a photo dropped next to the zone replace the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());

    document.addEventListener("paste", (event) => {
      if ($("panel-home").hidden) return;
      const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
      const item = items.find((it) => it.kind === "file" && it.type.startsWith("image/"));
      if (!item) return; // text pasted into a text field: leave it alone
      event.preventDefault();
      const blob = item.getAsFile();
      chooseFile(new File([blob], "pasted-image", { type: blob.type }));
    });
  }

  // ---------- captioning ----------

  function beamSize() {
    const value = Number.parseInt($("beam").value, 10);
    const max = state.info ? state.info.limits.max_beam_size : 10;
    if (!Number.isInteger(value) || value < 1 || value > max) return null;
    return value;
  }

  const VARIANTS = 5; // captions fetched at once for "Another caption"

  // The next of several different captions of the same photo and style; fetched on the first click.
  function another() {
    const v = state.variants;
    if (v && v.file === state.file && v.style === $("style").value && v.result.captions.length > 1) {
      v.index = (v.index + 1) % v.result.captions.length;
      showVariant();
      return;
    }
    captionize(VARIANTS);
  }

  function showVariant() {
    const { result, index } = state.variants;
    const captions = [result.captions[index], ...result.captions.filter((_, i) => i !== index)];
    // the attention map belongs to the best caption only
    showResult({ ...result, captions, attention: index === 0 ? result.attention : null,
      label: `Caption ${index + 1} of ${result.captions.length} (${result.style})` });
    setStatus($("status"), `Caption ${index + 1} of ${result.captions.length}: press Another caption for the next.`);
  }

  async function captionize(variants = 1) {
    const status = $("status");
    if (!state.file) {
      setStatus(status, "Choose an image first (Input Image).", true);
      return;
    }
    const k = beamSize();
    if (k === null) {
      setStatus(status, `Beam size must be a whole number from 1 to ${$("beam").max}.`, true);
      $("beam").focus();
      return;
    }
    if (state.busy) return;
    state.busy = true;
    const button = $("captionize");
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    setStatus(status, "Captioning...");
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    form.append("beam_size", String(k));
    form.append("n_best", String(k));
    if (variants > 1) form.append("variants", String(variants));
    if ($("style").value) form.append("style", $("style").value);
    const refs = $("references").value.trim();
    if (refs) form.append("references", refs);
    try {
      const result = await api("/api/captions", { method: "POST", body: form });
      state.variants = variants > 1 ? { file: state.file, style: $("style").value, result, index: 0 } : null;
      if (variants > 1 && result.captions.length > 1) state.variants.index = 1;
      if (state.variants) showVariant();
      else showResult(result);
      // On a phone the caption is below the photo: bring it into view, and move focus to it.
      const label = $("result-label");
      label.scrollIntoView({ block: "start" });
      label.focus({ preventScroll: true });
      const t = result.timing_ms || {};
      if (!state.variants) setStatus(status, `Done in ${formatNumber(t.server ?? 0)} ms (encoder ${formatNumber(t.encode ?? 0)} ms, ` +
        `decoder ${formatNumber(t.decode ?? 0)} ms).`);
    } catch (err) {
      setStatus(status, err.message, true);
    } finally {
      state.busy = false;
      button.disabled = !state.file;
      $("another").disabled = !state.file;
      button.removeAttribute("aria-busy");
    }
  }

  function showResult(result) {
    state.result = result;
    state.pinned = null;
    const area = $("result");
    const best = result.captions[0] || { text: "", score: 0 };
    const words = result.attention ? result.attention.words : [];

    const caption = el("p", { class: "best-caption", id: "best-caption", lang: "en" });
    if (words.length) {
      words.forEach((word, i) => {
        if (i) caption.append(" ");
        const button = el("button", { type: "button", class: "word", "data-index": i, "aria-pressed": "false",
          title: "Show where the model looked for this word", text: word });
        button.addEventListener("mouseenter", () => drawAttention(i));
        button.addEventListener("mouseleave", () => drawAttention(state.pinned));
        button.addEventListener("focus", () => drawAttention(i));
        button.addEventListener("blur", () => drawAttention(state.pinned));
        button.addEventListener("click", () => pinWord(i));
        caption.append(button);
      });
    } else {
      caption.textContent = best.text || "(the model gave an empty caption)";
    }

    const list = el("ol", { class: "candidates", "aria-label": "Beam search candidates, best first" });
    result.captions.forEach((cap, i) => {
      list.append(el("li", { class: i === 0 ? "best" : null },
        el("span", { class: "candidate-text", text: cap.text || "(empty)" }),
        el("span", { class: "score", title: "log-probability: closer to 0 is more likely",
          text: `score ${formatNumber(cap.score)}` })));
    });

    area.replaceChildren(
      el("p", { class: "label", id: "result-label", tabindex: "-1" }, result.label || `Best caption (${result.style})`),
      caption,
      agreementNote(best),
      tagList(result.tags),
      el("p", { class: "small muted" }, words.length
        ? "Hover, focus or click a word to see where the model looked."
        : ""),
      el("h3", { text: result.label ? "Other captions" : `Candidates (beam size ${result.beam_size})` }),
      list,
    );
    $("result-tools").hidden = false;
    $("alt-text").value = best.text;
    $("preview").alt = best.text ? `Photo: ${best.text}` : "The captioned photo";
    $("speak").disabled = !("speechSynthesis" in window) || !best.text;
    drawAttention(null);
    if (result.bleu) showBleu(result.bleu);
    else $("bleu").replaceChildren();
  }

  // The encoder's ImageNet labels: they can name what the captions cannot.
  // How far the caption agrees with what the encoder sees (the API's confidence, unsupported, missed).
  function agreementNote(caption) {
    if (caption.confidence === undefined || caption.confidence === null) return null;
    const parts = [`Agreement with what the encoder sees: ${Math.round(caption.confidence * 100)}%.`];
    if (caption.unsupported && caption.unsupported.length)
      parts.push(`It does not see: ${caption.unsupported.join(", ")}.`);
    if (caption.missed && caption.missed.length)
      parts.push(`It also sees: ${caption.missed.join(", ")}.`);
    return el("p", { class: "agreement small" + (caption.confidence < 0.5 ? " warn" : ""), id: "agreement",
      text: parts.join(" ") });
  }

  function tagList(tags) {
    if (!tags || !tags.length) return null;
    return el("ul", { class: "tags", "aria-label": "Tags (ImageNet labels with their probability)" },
      ...tags.map((t) => el("li", { class: "tag", title: `probability ${formatNumber(t.probability)}` },
        el("span", { text: t.label }), el("span", { class: "tag-p", text: ` ${Math.round(t.probability * 100)}%` }))));
  }

  function clearResult() {
    state.result = null;
    state.pinned = null;
    drawAttention(null);
    $("result").replaceChildren(el("p", { id: "result-placeholder", class: "muted", text: "Captions will appear here..." }));
    $("result-tools").hidden = true;
    $("alt-text").value = "";
    $("bleu").replaceChildren();
  }

  // ---------- attention heatmap ----------

  // A perceptual "inferno"-like colour map, dark (little attention) to bright yellow (most).
  const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

  function colour(v) {
    const x = Math.min(Math.max(v, 0), 1) * (STOPS.length - 1);
    const i = Math.min(Math.floor(x), STOPS.length - 2);
    const f = x - i;
    return STOPS[i].map((c, j) => Math.round(c + (STOPS[i + 1][j] - c) * f));
  }

  function pinWord(i) {
    state.pinned = state.pinned === i ? null : i;
    for (const button of document.querySelectorAll("#best-caption .word")) {
      button.setAttribute("aria-pressed", String(Number(button.dataset.index) === state.pinned));
    }
    drawAttention(state.pinned ?? i);
  }

  function drawAttention(index) {
    const canvas = $("heatmap");
    const label = $("attention-label");
    const att = state.result && state.result.attention;
    for (const button of document.querySelectorAll("#best-caption .word")) {
      button.classList.toggle("active", Number(button.dataset.index) === index);
    }
    if (index === null || index === undefined || !att || !att.weights[index]) {
      state.shown = null;
      canvas.hidden = true;
      label.textContent = "";
      return;
    }
    state.shown = index;
    paintHeatmap(canvas, $("preview"), att.weights[index], att.grid || 7);
    label.textContent = `Attention for "${att.words[index]}": brighter is where the model looked.`;
  }

  function paintHeatmap(canvas, img, weights, grid) {
    const width = Math.max(1, Math.round(img.clientWidth));
    const height = Math.max(1, Math.round(img.clientHeight));
    const max = Math.max(...weights) || 1;

    // 7x7 cells -> a tiny canvas -> scaled up with smoothing (bilinear upsampling).
    const small = document.createElement("canvas");
    small.width = grid;
    small.height = grid;
    const sctx = small.getContext("2d");
    const data = sctx.createImageData(grid, grid);
    for (let cell = 0; cell < grid * grid; cell += 1) {
      const v = (weights[cell] || 0) / max;
      const [r, g, b] = colour(v);
      data.data.set([r, g, b, Math.round(255 * (0.72 - 0.42 * v))], cell * 4);
    }
    sctx.putImageData(data, 0, 0);

    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(small, 0, 0, width, height);
    canvas.hidden = false;
  }

  function redrawAttention() {
    if (state.shown !== null) drawAttention(state.shown);
  }

  // ---------- speak, copy, refresh ----------

  function speak() {
    const text = state.result && state.result.captions[0] ? state.result.captions[0].text : "";
    if (!text || !("speechSynthesis" in window)) return;
    window.speechSynthesis.cancel();
    const utterance = new SpeechSynthesisUtterance(text);
    utterance.lang = "en-US";
    window.speechSynthesis.speak(utterance);
    setStatus($("status"), "Speaking the caption.");
  }

  async function copyAltText() {
    const input = $("alt-text");
    const text = input.value;
    if (!text) return;
    try {
      await navigator.clipboard.writeText(text);
    } catch (err) {
      input.select();
      document.execCommand("copy"); // fallback where the Clipboard API is not allowed
    }
    setStatus($("status"), "Alt text copied.");
  }

  function refresh(focus = true) {
    if (state.url) URL.revokeObjectURL(state.url);
    state.url = null;
    state.file = null;
    $("file").value = "";
    const preview = $("preview");
    preview.removeAttribute("src");
    preview.alt = "The photo to caption";
    $("preview-figure").hidden = true;
    $("placeholder").hidden = false;
    $("pick-again").hidden = true;
    $("captionize").disabled = true;
    $("another").disabled = true;
    state.variants = null;
    $("references").value = "";
    if ("speechSynthesis" in window) window.speechSynthesis.cancel();
    clearResult();
    setStatus($("status"), "");
    if (focus) $("pick").focus();
  }

  // ---------- BLEU ----------

  function showBleu(bleu) {
    const table = el("table", { class: "bleu-table" },
      el("caption", { text: "BLEU of the best caption against your references (0 to 1, higher is better)" }));
    const head = el("tr");
    const row = el("tr");
    for (const key of ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "BLEU"]) {
      head.append(el("th", { scope: "col", text: key === "BLEU" ? "BLEU (combined)" : key }));
      row.append(el("td", { "data-metric": key, text: (bleu[key] ?? 0).toFixed(3) }));
    }
    table.append(el("thead", {}, head), el("tbody", {}, row));
    $("bleu").replaceChildren(table);
  }

  async function score() {
    const status = $("status");
    const refs = $("references").value.trim();
    if (!state.result) {
      setStatus(status, "Captionize an image first; then its caption is scored against your references.", true);
      return;
    }
    if (!refs) {
      setStatus(status, "Write at least one reference caption (one per line).", true);
      $("references").focus();
      return;
    }
    try {
      const body = await api("/api/bleu", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ candidate: state.result.captions[0].text, references: refs }),
      });
      showBleu(body.bleu);
      setStatus(status, "Scored.");
    } catch (err) {
      setStatus(status, err.message, true);
    }
  }

  // ---------- Query tab ----------

  async function runSearch(q) {
    state.searched = true;
    const status = $("search-status");
    const list = $("results");
    setStatus(status, "Searching...");
    try {
      const body = await api(`/api/search?q=${encodeURIComponent(q)}&limit=48`);
      list.replaceChildren(...body.results.map(resultItem));
      let message;
      if (body.match === "recent") message = body.count ? `The ${body.count} latest captioned images.` : "The gallery is empty: caption a photo on Home.";
      else if (!body.count) message = `No captions match "${q}".`;
      else message = `${body.count} image${body.count === 1 ? "" : "s"} match${body.count === 1 ? "es" : ""} ` +
        `${body.match === "all" ? "all" : "some"} of the words, best first.`;
      setStatus(status, message);
    } catch (err) {
      setStatus(status, err.message, true);
    }
  }

  function formatDate(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  function resultItem(item) {
    const best = item.captions[0] ? item.captions[0].text : "";
    const img = el("img", { src: item.thumbnail_url, alt: best || "A captioned image", loading: "lazy" });
    const others = item.captions.slice(1, 3).map((c) => c.text).filter(Boolean);
    const open = el("button", { type: "button", class: "thumb", "aria-label": `Details: ${best}` }, img);
    open.addEventListener("click", () => openDetail(item.id, open));
    const remove = el("button", { type: "button", class: "secondary delete", text: "Delete",
      "aria-label": `Delete from the gallery: ${best}` });
    remove.addEventListener("click", () => deleteItem(item.id, remove));
    const tags = (item.tags || []).map((t) => t.label).join(", ");
    return el("li", { class: "gallery-item", "data-id": item.id },
      el("figure", {}, open,
        el("figcaption", {},
          el("span", { class: "gallery-caption", text: best || "(empty caption)" }),
          others.length ? el("span", { class: "small muted others", text: `Also: ${others.join(" / ")}` }) : null,
          tags ? el("span", { class: "small muted gallery-tags", text: `Tags: ${tags}` }) : null,
          el("span", { class: "small muted", text: `${Object.keys(item.styles || {}).join(", ") || item.style} - ${formatDate(item.updated || item.created)}` }))),
      remove);
  }

  async function deleteItem(id, button) {
    if (!window.confirm("Delete this photo and its captions from the gallery?")) return;
    try {
      await api(`/api/images/${encodeURIComponent(id)}`, { method: "DELETE" });
    } catch (err) {
      setStatus($("search-status"), err.message, true);
      return;
    }
    const item = button.closest(".gallery-item");
    const next = item && (item.nextElementSibling || item.previousElementSibling);
    if (item) item.remove();
    if ($("detail").open) $("detail").close();
    setStatus($("search-status"), "Deleted from the gallery.");
    // Keep the keyboard user in the list: the neighbour's Delete button, else the search field.
    (next ? next.querySelector(".thumb") : $("q")).focus();
  }

  // ---------- detail view of a gallery photo ----------

  let detailShown = null; // {attention, img, canvas, label} of the style whose words are shown

  async function openDetail(id, opener) {
    const dialog = $("detail");
    let item;
    try {
      item = await api(`/api/images/${encodeURIComponent(id)}/details`);
    } catch (err) {
      setStatus($("search-status"), err.message, true);
      return;
    }
    const best = item.captions[0] ? item.captions[0].text : "";
    const img = el("img", { id: "detail-image", src: item.image_url, alt: best || "A captioned photo" });
    const canvas = el("canvas", { class: "heatmap", hidden: true, "aria-hidden": "true" });
    const label = el("p", { class: "small", "aria-live": "polite" });
    detailShown = null;
    const styles = Object.entries(item.styles || {});
    const sections = styles.map(([style, entry]) => {
      const att = entry.attention;
      const first = entry.captions[0] ? entry.captions[0].text : "";
      let caption;
      if (att && att.words && att.words.length) {
        caption = el("p", { class: "best-caption detail-caption", lang: "en" });
        att.words.forEach((word, i) => {
          if (i) caption.append(" ");
          const show = () => {
            detailShown = { att, img, canvas, label, index: i };
            paintHeatmap(canvas, img, att.weights[i], att.grid || 7);
            label.textContent = `Attention for "${word}" (${style}).`;
          };
          const hide = () => { canvas.hidden = true; label.textContent = ""; detailShown = null; };
          const button = el("button", { type: "button", class: "word", text: word, title: "Show where the model looked" });
          button.addEventListener("mouseenter", show);
          button.addEventListener("focus", show);
          button.addEventListener("mouseleave", hide);
          button.addEventListener("blur", hide);
          caption.append(button);
        });
      } else {
        caption = el("p", { class: "best-caption detail-caption", lang: "en", text: first || "(empty caption)" });
      }
      return el("section", { class: "detail-style" },
        el("h3", { text: `${style} - ${formatDate(entry.created)}` }), caption,
        el("ol", { class: "candidates" }, ...entry.captions.slice(1).map((c) =>
          el("li", {}, el("span", { class: "candidate-text", text: c.text }),
            el("span", { class: "score", text: `score ${formatNumber(c.score)}` })))));
    });
    const close = el("button", { type: "button", class: "secondary", id: "detail-close", text: "Close" });
    close.addEventListener("click", () => dialog.close());
    const remove = el("button", { type: "button", class: "secondary delete", text: "Delete" });
    remove.addEventListener("click", () => deleteItem(item.id, opener));
    dialog.replaceChildren(
      el("div", { class: "detail-head" }, el("h2", { id: "detail-title", text: "Gallery photo" }), close),
      el("div", { class: "detail-grid" },
        el("div", {}, el("div", { class: "preview-wrap" }, img, canvas), label),
        el("div", {},
          tagList(item.tags),
          ...sections,
          el("p", { class: "small muted", text: `Added ${formatDate(item.created)}; last captioned ` +
            `${formatDate(item.updated)}. ${item.width}x${item.height} pixels${item.source ? `, from ${item.source}` : ""}.` }),
          el("div", { class: "actions" },
            el("a", { href: item.image_url, target: "_blank", rel: "noopener", text: "Open the full image" }), remove))));
    dialog.addEventListener("close", () => { if (opener && opener.isConnected) opener.focus(); }, { once: true });
    dialog.showModal();
    close.focus();
  }

  // ---------- Info tab ----------

  function valueNode(value) {
    if (value === null || value === undefined) return document.createTextNode("-");
    if (Array.isArray(value)) {
      if (value.every((v) => v === null || typeof v !== "object")) {
        return document.createTextNode(value.map((v) => (typeof v === "number" ? formatNumber(v) : String(v))).join(", "));
      }
      return el("ol", {}, ...value.map((v) => el("li", {}, valueNode(v))));
    }
    if (typeof value === "object") {
      const table = el("table", { class: "kv" });
      const body = el("tbody");
      for (const [key, v] of Object.entries(value)) {
        body.append(el("tr", {}, el("th", { scope: "row", text: prettyKey(key) }), el("td", {}, valueNode(v))));
      }
      table.append(body);
      return table;
    }
    if (typeof value === "number") return document.createTextNode(formatNumber(value));
    return document.createTextNode(String(value));
  }

  function section(title, ...content) {
    return el("section", { class: "info-section" }, el("h3", { text: title }), ...content);
  }

  function renderInfo(info) {
    const a = info.architecture || {};
    const lat = info.latency || {};
    const metrics = info.metrics || {};
    const data = info.training_data || {};
    const latency = lat.count
      ? `Median over the last ${lat.count} caption${lat.count === 1 ? "" : "s"} on this server: ` +
        `${formatNumber(lat.model_ms_median ?? 0)} ms per image (encoder ${formatNumber(lat.encode_ms_median ?? 0)} ms, ` +
        `decoder ${formatNumber(lat.decode_ms_median ?? 0)} ms).`
      : "Not measured yet: caption a photo and look again.";
    const details = (title, id, ...content) => el("details", { class: "info-more", id },
      el("summary", { text: title }), ...content);
    $("info").replaceChildren(
      el("h2", { text: `Model card: ${info.name}` }),
      // Short and readable first; the raw facts are folded below.
      el("div", { id: "card-summary", class: "card-summary" }, ...(info.summary || []).map((t) => el("p", { text: t }))),
      section("Limitations", el("ul", { id: "limitations" }, ...(info.limitations || []).map((t) => el("li", { text: t })))),
      section("Speed", el("p", { id: "latency", text: latency })),
      details("Architecture", "info-architecture", el("div", { class: "table-scroll" }, valueNode({
        encoder: `${a.encoder} (ImageNet-pretrained${a.encoder_fine_tuned ? ", last stage fine-tuned" : ", frozen"})`,
        "encoder features": a.encoder_features,
        "encoder parameters": a.encoder_parameters,
        decoder: a.decoder,
        "decoder parameters": a.decoder_parameters,
        vocabulary: a.vocabulary === undefined ? undefined : `${formatNumber(a.vocabulary)} words`,
        "longest caption": a.max_caption_words === undefined ? undefined : `${a.max_caption_words} words`,
        styles: (info.styles || []).join(", "),
        "training data": data.description,
        "style data": data.style_data,
        backend: info.runtime || info.backend,
      }))),
      details("All evaluation metrics (metrics.json)", "info-metrics", Object.keys(metrics).length
        ? el("div", { id: "metrics", class: "table-scroll" }, valueNode(metrics))
        : el("p", { id: "metrics", class: "muted", text: "This model folder has no metrics.json." })),
      info.command ? details("How it was made (COMMAND.txt)", "info-command", el("pre", { class: "command", text: info.command })) : null,
      section("This server", el("p", { text: `${formatNumber(info.gallery_images ?? 0)} images in the gallery. ` +
        `Uploads up to ${formatBytes(info.limits.max_upload_bytes)} and ${formatNumber(info.limits.max_pixels)} pixels. ` +
        `Version ${info.version}. API schema: ` }, el("a", { href: "/openapi.json", text: "/openapi.json" }))),
    );
  }

  async function loadInfo() {
    try {
      const info = await api("/api/info");
      applyInfo(info);
      renderInfo(info);
    } catch (err) {
      $("info").replaceChildren(el("p", { class: "error", text: `Cannot load the model card: ${err.message}` }));
    }
  }

  function applyInfo(info) {
    const first = !state.info;
    state.info = info;
    state.maxBytes = info.limits.max_upload_bytes;
    $("max-size").textContent = formatBytes(state.maxBytes);
    $("beam").max = String(info.limits.max_beam_size);
    if (first) {
      const select = $("style");
      select.replaceChildren(...info.styles.map((s) => el("option", { value: s, text: s })));
      select.value = info.default_style;
    }
  }

  // ---------- start ----------

  document.addEventListener("DOMContentLoaded", () => {
    setupInput();
    setupTabs();
    $("captionize").addEventListener("click", () => captionize());
    $("another").addEventListener("click", another);
    $("refresh").addEventListener("click", refresh);
    $("speak").addEventListener("click", speak);
    $("copy").addEventListener("click", copyAltText);
    $("score").addEventListener("click", score);
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      runSearch($("q").value.trim());
    });
    $("preview").addEventListener("load", redrawAttention);
    $("preview").addEventListener("error", previewFailed);
    window.addEventListener("resize", () => {
      if (detailShown) paintHeatmap(detailShown.canvas, detailShown.img, detailShown.att.weights[detailShown.index], detailShown.att.grid || 7);
    });
    window.addEventListener("resize", redrawAttention);
    if (!("speechSynthesis" in window)) $("speak").disabled = true;
    if ($("panel-info").hidden) loadInfo();
  });
})();
