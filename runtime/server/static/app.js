// sdrt kiosk page: calls the server's A1111 API (/sdapi/v1/txt2img, /progress, /interrupt).
// Loads nothing from the internet; images stay in this page (blob: URLs) until it closes.
"use strict";

const POLL_MS = 400; // progress polling interval while a job runs
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("sdrt-token") || "";
let taskId = null;

// A kiosk can be opened as http://host:7860/#token=...; the fragment never reaches the server.
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) {
  token = fromHash;
  sessionStorage.setItem("sdrt-token", token);
  history.replaceState(null, "", location.pathname);
}

class ApiError extends Error {}

async function api(path, body) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    $("auth").showModal();
    throw new ApiError("the server needs its access token");
  }
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    throw new ApiError((data.detail || response.statusText) +
      (retry ? ` (try again in ${retry} s)` : ""));
  }
  return data;
}

function randomHex(bytes) {
  const values = crypto.getRandomValues(new Uint8Array(bytes)); // works over plain http too
  return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
}

function integer(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number.parseInt(value, 10);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// An error belongs to the input that caused it: once the form is valid again, it goes.
function clearStaleError() {
  if ($("status").classList.contains("error") && !taskId && $("form").checkValidity()) {
    setStatus("Ready");
  }
}

let polling = false;
async function poll() {
  if (polling || !taskId) return;
  polling = true;
  try {
    const p = await api("/sdapi/v1/progress?id_task=" + encodeURIComponent(taskId));
    if (p.state.job === taskId) {
      $("progress").value = p.progress;
      setStatus(p.textinfo || "");
      if (p.current_image) {
        $("preview").src = "data:image/png;base64," + p.current_image;
        $("preview").hidden = false;
      }
    }
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    polling = false;
  }
}

function pngBlob(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function addToGallery(data) {
  const info = JSON.parse(data.info);
  data.images.forEach((image, i) => {
    const url = URL.createObjectURL(pngBlob(image));
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = info.all_prompts[i];
    const link = document.createElement("a");
    link.href = url;
    link.download = `sdrt-${info.all_seeds[i]}.png`;
    link.textContent = "Download PNG (with its generation parameters)";
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = `seed ${info.all_seeds[i]}`;
    const text = document.createElement("pre");
    text.textContent = info.infotexts[i];
    details.append(summary, text);
    const caption = document.createElement("figcaption");
    caption.append(link, details);
    figure.append(img, caption);
    $("gallery").prepend(figure);
  });
}

async function generate(event) {
  event.preventDefault();
  taskId = `task(${randomHex(8)})`;
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: integer("width"),
    height: integer("height"),
    steps: integer("steps"),
    seed: integer("seed") ?? -1,
    force_task_id: taskId,
  };
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("progress").value = 0;
  $("preview").hidden = true;
  setStatus("Queued");
  const timer = setInterval(poll, POLL_MS);
  try {
    const data = await api("/sdapi/v1/txt2img", body);
    clearInterval(timer);
    $("progress").value = 1;
    const info = JSON.parse(data.info);
    setStatus(info.interrupted ? "Stopped" : `Done (seed ${info.seed})`);
    addToGallery(data);
  } catch (error) {
    clearInterval(timer);
    setStatus(error instanceof ApiError ? error.message : "the server is unreachable", true);
  } finally {
    taskId = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

async function stop() {
  if (!taskId) return;
  await api("/sdapi/v1/interrupt?id_task=" + encodeURIComponent(taskId), {}).catch(() => {});
}

async function loadConfig() {
  try {
    const config = await api("/sdrt/v1/config");
    $("model").textContent = config.model;
    // a prompt this model was made for (its manifest's example), not one it cannot draw
    if (config.example_prompt) $("prompt").placeholder = config.example_prompt;
    clearStaleError();
    for (const [id, value] of [["width", config.default_width],
      ["height", config.default_height], ["steps", config.default_steps]]) {
      $(id).value = value;
    }
    for (const id of ["width", "height"]) $(id).step = config.size_multiple;
    $("steps").max = config.max_steps;
  } catch (error) {
    setStatus(error.message, true);
  }
}

$("form").addEventListener("submit", generate);
$("form").addEventListener("input", clearStaleError);
$("stop").addEventListener("click", stop);
$("auth-form").addEventListener("submit", () => {
  token = $("token").value;
  sessionStorage.setItem("sdrt-token", token);
  loadConfig();
});
loadConfig();
