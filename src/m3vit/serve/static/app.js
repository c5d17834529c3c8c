// m3vit serve: the page. Plain JS, no dependencies (it must work offline).
// One image per session of the page; each checked task's map is fetched once per image and kept, so
// toggling a task only shows or hides what is already there, and checking a new task asks for that task only.
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);
  const state = {
    info: null,          // GET /api/info
    file: null,          // the image being shown
    imageURL: null,      // object URL of that image
    imageSize: null,     // [width, height] as the browser decoded it
    generation: 0,       // bumped for each new image; answers for an older image are dropped
    maps: new Map(),     // task -> {png, ms, experts, experts_read, bytes_read}
    pending: new Set(),  // tasks asked for and not answered yet
    cards: new Map(),    // task -> its card element (kept while hidden)
    opacity: new Map(),  // task -> overlay opacity in percent
    memoryMB: null,
  };
  const DEFAULT_OPACITY = 75;

  function showError(message) {
    const el = $("#error");
    el.textContent = message || "";
    el.hidden = !message;
  }

  function setStatus(message) {
    $("#status").textContent = message || "";
  }

  function formatMB(mb) {
    return mb == null ? "" : `${Math.round(mb)} MB resident`;
  }

  function checkedTasks() {
    return Array.from(document.querySelectorAll('input[name="task"]:checked')).map((box) => box.value);
  }

  // ---------------------------------------------------------------------------------------------
  // The model's description and the task checkboxes
  // ---------------------------------------------------------------------------------------------
  async function loadInfo() {
    let body = null;
    try {
      const resp = await fetch("api/info");
      body = await resp.json();
      if (!resp.ok) throw new Error(body && body.error ? body.error : `HTTP ${resp.status}`);
    } catch (err) {
      showError(`cannot read the model's description: ${err.message}`);
      $("#model-info").textContent = "";
      return;
    }
    state.info = body;
    state.memoryMB = body.memory_mb;
    describeModel();
    buildTaskList();
  }

  function describeModel() {
    const info = state.info;
    const moe = info.num_experts
      ? `${info.num_experts} experts, top-${info.top_k}, MoE blocks ${info.moe_blocks.join(", ")}`
      : "dense (no MoE blocks)";
    const experts = info.streaming ? "experts streamed from the checkpoint" : "experts resident";
    $("#model-info").textContent = [
      info.model, `${info.tasks.length} tasks`, moe, `input ${info.input_size.join("×")}`, experts, info.device,
      formatMB(state.memoryMB),
    ].filter(Boolean).join(" · ");
  }

  function buildTaskList() {
    const list = $("#task-list");
    for (const task of state.info.tasks) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.name = "task";
      box.value = task;
      box.checked = true;
      box.addEventListener("change", () => onToggle(task, box.checked));
      label.append(box, ` ${task}`);
      list.appendChild(label);
    }
  }

  function onToggle(task, checked) {
    if (checked && state.file && !state.maps.has(task) && !state.pending.has(task)) {
      requestTasks([task]);  // only the newly checked task: the others are already there
    }
    render();
  }

  // ---------------------------------------------------------------------------------------------
  // The image
  // ---------------------------------------------------------------------------------------------
  function setFile(file) {
    if (!file) return;
    state.generation += 1;
    state.file = file;
    state.maps.clear();
    state.pending.clear();
    state.imageSize = null;
    if (state.imageURL) URL.revokeObjectURL(state.imageURL);
    state.imageURL = URL.createObjectURL(file);
    showError("");
    const img = $("#source-image");
    img.onload = () => {
      state.imageSize = [img.naturalWidth, img.naturalHeight];
      $("#source-caption").textContent = `${file.name || "dropped image"} · ${img.naturalWidth}×${img.naturalHeight}`;
      $("#source").hidden = false;
      render();
    };
    img.onerror = () => { $("#source").hidden = true; };
    img.src = state.imageURL;
    const tasks = checkedTasks();
    if (tasks.length) requestTasks(tasks);
    else setStatus("check a task to see its map");
    render();
  }

  async function requestTasks(tasks) {
    const generation = state.generation;
    tasks.forEach((task) => state.pending.add(task));
    setStatus(`computing ${tasks.join(", ")}…`);
    render();
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    form.append("tasks", tasks.join(","));
    let message = null;
    let body = null;
    try {
      const resp = await fetch("api/predict", { method: "POST", body: form });
      try { body = await resp.json(); } catch (_) { body = null; }
      if (!resp.ok || !body || !body.tasks) {
        message = body && body.error ? body.error : `the server answered HTTP ${resp.status}`;
      }
    } catch (err) {
      message = `the request failed: ${err.message}`;
    }
    if (generation !== state.generation) return;  // a newer image replaced this one meanwhile
    tasks.forEach((task) => state.pending.delete(task));
    if (message) {
      showError(message);
      setStatus("");
    } else {
      for (const [task, result] of Object.entries(body.tasks)) {
        state.maps.set(task, { ...result, experts: (body.experts && body.experts[task]) || [] });
      }
      state.memoryMB = body.memory_mb;
      const ms = Object.values(body.tasks).reduce((sum, r) => sum + r.ms, 0);
      setStatus(`${Object.keys(body.tasks).join(", ")}: ${ms.toFixed(1)} ms of pathway time`);
      describeModel();
    }
    render();
  }

  // ---------------------------------------------------------------------------------------------
  // Task cards: the map over the image, its opacity, latency and expert heatmap
  // ---------------------------------------------------------------------------------------------
  function makeCard(task) {
    const card = document.createElement("article");
    card.className = "task-card";
    card.dataset.taskCard = task;
    const head = document.createElement("header");
    const title = document.createElement("h2");
    title.textContent = task;
    const latency = document.createElement("span");
    latency.className = "latency";
    latency.dataset.taskLatency = task;
    head.append(title, latency);

    const stage = document.createElement("div");
    stage.className = "stage";

    const opacity = document.createElement("label");
    opacity.className = "opacity";
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = "0";
    slider.max = "100";
    slider.value = String(state.opacity.get(task) ?? DEFAULT_OPACITY);
    slider.dataset.taskOpacity = task;
    slider.setAttribute("aria-label", `opacity of the ${task} map over the image`);
    const shown = document.createElement("output");
    shown.textContent = `${slider.value}%`;
    slider.addEventListener("input", () => {
      state.opacity.set(task, Number(slider.value));
      shown.textContent = `${slider.value}%`;
      const img = stage.querySelector("img[data-task]");
      if (img) img.style.opacity = String(Number(slider.value) / 100);
    });
    opacity.append("overlay", slider, shown);

    const experts = document.createElement("div");
    experts.className = "experts";
    const canvas = document.createElement("canvas");
    canvas.dataset.taskExperts = task;
    const caption = document.createElement("p");
    experts.append(canvas, caption);

    card.append(head, stage, opacity, experts);
    return card;
  }

  function updateCard(card, task) {
    const stage = card.querySelector(".stage");
    const result = state.maps.get(task);
    const size = state.imageSize;
    if (state.imageURL) stage.style.backgroundImage = `url("${state.imageURL}")`;
    let img = stage.querySelector("img[data-task]");
    if (!result) {
      if (img) img.remove();
      img = null;
    } else if (!img || img.dataset.generation !== String(state.generation)) {
      if (img) img.remove();
      img = document.createElement("img");
      img.dataset.task = task;
      img.dataset.generation = String(state.generation);
      img.alt = `${task} map`;
      img.onload = () => {
        if (!state.imageSize) stage.style.aspectRatio = `${img.naturalWidth} / ${img.naturalHeight}`;
      };
      img.src = `data:image/png;base64,${result.png}`;
      stage.appendChild(img);
    }
    if (img) img.style.opacity = String((state.opacity.get(task) ?? DEFAULT_OPACITY) / 100);
    if (size) stage.style.aspectRatio = `${size[0]} / ${size[1]}`;
    else if (!stage.style.aspectRatio) stage.style.aspectRatio = "1 / 1";

    let pending = stage.querySelector(".pending");
    if (state.pending.has(task) && !result) {
      if (!pending) {
        pending = document.createElement("div");
        pending.className = "pending";
        pending.textContent = "computing…";
        stage.appendChild(pending);
      }
    } else if (pending) {
      pending.remove();
    }

    const latency = card.querySelector(".latency");
    if (result) {
      let text = `${result.ms.toFixed(1)} ms`;
      if (state.info.streaming) text += ` · ${result.experts_read} experts read`;
      latency.textContent = text;
    } else {
      latency.textContent = "";
    }
    drawExperts(card.querySelector("canvas"), card.querySelector(".experts p"), result ? result.experts : null);
  }

  function render() {
    if (!state.info) return;
    const container = $("#maps");
    const checked = new Set(checkedTasks());
    for (const task of state.info.tasks) {
      const show = state.file && checked.has(task) && (state.maps.has(task) || state.pending.has(task));
      let card = state.cards.get(task);
      if (!show) {
        if (card && card.isConnected) card.remove();
        continue;
      }
      if (!card) {
        card = makeCard(task);
        state.cards.set(task, card);
      }
      updateCard(card, task);
      container.appendChild(card);  // appending in task order keeps the cards in the model's order
    }
  }

  // Heatmap: one row per MoE block, one column per expert; darker = a larger share of the block's
  // token -> expert assignments for this image and task; grey = never chosen.
  function drawExperts(canvas, caption, experts) {
    canvas.dataset.counts = experts ? JSON.stringify(experts) : "";
    if (!experts || !experts.length) {
      canvas.hidden = true;
      caption.textContent = experts ? "dense model: no experts to show" : "";
      return;
    }
    canvas.hidden = false;
    const numExperts = Math.max(state.info.num_experts, ...experts.map((b) => b.counts.length));
    const cell = Math.max(6, Math.min(18, Math.floor(232 / numExperts)));
    const left = 56;
    const top = 14;
    canvas.width = left + numExperts * cell + 1;
    canvas.height = top + experts.length * cell + 1;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.font = "10px sans-serif";
    ctx.fillStyle = "#5b6475";
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    const step = cell >= 12 ? 1 : 4;
    for (let e = 0; e < numExperts; e += step) ctx.fillText(String(e), left + e * cell + cell / 2, top - 2);
    const shares = experts.map((b) => {
      const total = b.counts.reduce((a, c) => a + c, 0) || 1;
      return b.counts.map((c) => c / total);
    });
    const peak = Math.max(...shares.flat(), 1e-9);
    const lines = [];
    experts.forEach((block, row) => {
      const y = top + row * cell;
      ctx.fillStyle = "#5b6475";
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      ctx.fillText(`block ${block.block}`, left - 4, y + cell / 2);
      for (let e = 0; e < numExperts; e += 1) {
        const share = shares[row][e] || 0;
        ctx.fillStyle = share > 0 ? ramp(share / peak) : "#eef0f3";
        ctx.fillRect(left + e * cell, y, cell - 1, cell - 1);
      }
      const top3 = shares[row].map((s, e) => [s, e]).filter(([s]) => s > 0).sort((a, b) => b[0] - a[0]).slice(0, 3);
      lines.push(`block ${block.block}: ` + top3.map(([s, e]) => `expert ${e} ${(100 * s).toFixed(0)}%`).join(", "));
    });
    canvas.title = lines.join("\n");
    canvas.setAttribute("aria-label", `experts chosen per MoE block: ${lines.join("; ")}`);
    caption.textContent = "experts (columns) chosen per MoE block (rows) for this image";
  }

  function ramp(t) {  // light blue -> dark blue
    const a = [219, 232, 246];
    const b = [8, 48, 107];
    const c = a.map((v, i) => Math.round(v + (b[i] - v) * Math.min(1, Math.max(0, t))));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }

  // ---------------------------------------------------------------------------------------------
  // Wiring
  // ---------------------------------------------------------------------------------------------
  $("#image-input").addEventListener("change", (event) => setFile(event.target.files[0]));
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    document.body.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) setFile(file);
  });
  loadInfo();
})();
