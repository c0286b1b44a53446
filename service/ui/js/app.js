// The playground's wiring: method choice, pictures, forms -> jobs -> progress -> the result view.
import { ApiError, cancelJob, dataUrl, formData, getApiKey, request, setApiKey, waitForJob } from "./api.js";
import { BACKGROUND, colour, Viewer } from "./viewer.js";

const $ = (selector, root = document) => root.querySelector(selector);

/** "a, b ,, c" -> ["a", "b", "c"] (names never contain commas: the API refuses them). */
function words(text) {
  return text.split(",").map((w) => w.trim()).filter(Boolean);
}

function valueOrNull(input) {
  return input.value.trim() === "" ? null : input.value.trim();
}

// ---------------------------------------------------------------- errors shown to people

const STATUS_HINTS = {
  0: "No answer",
  401: "API key needed",
  404: "Not found",
  409: "Not possible now",
  413: "Too large",
  415: "Not a supported picture",
  422: "Check the field",
  429: "The queue is full",
  503: "The service is busy",
};

/** A job that ended failed: the worker's code and message. */
class JobFailed extends Error {
  constructor(error) {
    super(error?.message || "no reason given");
    this.code = error?.code || "failed";
  }
}

function clearErrors(form) {
  const box = $(".error", form);
  box.hidden = true;
  box.replaceChildren();
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  $("#api-key").removeAttribute("aria-invalid");
}

/** The input an error's `field` names ("classes.0", "masks[0] (m.png)" -> classes, masks), if shown. */
function inputForField(form, field) {
  if (!field) return null;
  const name = field.split(/[.[\s]/)[0];
  return [...form.querySelectorAll(`[name="${CSS.escape(name)}"]`)].find((input) => !input.closest("[hidden]")) || null;
}

/** Shows an error in the form's alert box and points at the field it names (or the key field). */
function showError(form, error) {
  const box = $(".error", form);
  const title = document.createElement("strong");
  const text = document.createElement("span");
  if (error instanceof JobFailed) {
    title.textContent = `The job failed (${error.code})`;
    text.textContent = error.message;
  } else if (error instanceof ApiError) {
    const hint = STATUS_HINTS[error.status] || (error.status >= 500 ? "Server error" : "Request refused");
    title.textContent = error.status ? `${hint} (${error.status} ${error.code})` : hint;
    let message = error.message;
    if (error.retryAfter) message += ` Try again in ${error.retryAfter} s.`;
    if (error.status === 401) message += " Enter the key in the API key field at the top.";
    text.textContent = message;
  } else {
    title.textContent = "Something went wrong";
    text.textContent = error.message || String(error);
  }
  box.replaceChildren(title, text);
  box.hidden = false;
  const target = error.status === 401 ? $("#api-key") : inputForField(form, error.field);
  if (target) {
    target.setAttribute("aria-invalid", "true");
    const details = target.closest("details");
    if (details) details.open = true;
    target.focus();
  } else {
    box.scrollIntoView({ block: "nearest" });
  }
}

/** A check made here before sending; shown like the API's own field errors. */
function fieldError(field, message) {
  return new ApiError(422, "invalid_field", message, { field });
}

// ---------------------------------------------------------------- pictures

function setupDrop(zone) {
  const input = $("input[type=file]", zone);
  const preview = $(".drop-preview", zone);
  const text = $(".drop-text", zone);
  const label = $(".drop-zone", zone);
  const original = text.innerHTML;
  const update = () => {
    const [file, ...more] = input.files;
    if (preview.src) URL.revokeObjectURL(preview.src);
    if (!file) {
      preview.hidden = true;
      preview.removeAttribute("src");
      text.innerHTML = original;
      return;
    }
    preview.src = URL.createObjectURL(file); // several files (concept photos): the first one shows
    preview.hidden = false;
    text.textContent = more.length ? `${more.length + 1} files: ${[file, ...more].map((f) => f.name).join(", ")}`
      : file.name;
    input.removeAttribute("aria-invalid");
    if ("mask" in zone.dataset) describeMask(file, preview);
  };
  input.addEventListener("change", update);
  for (const type of ["dragenter", "dragover"]) {
    label.addEventListener(type, (event) => {
      event.preventDefault();
      label.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) label.addEventListener(type, () => label.classList.remove("over"));
  label.addEventListener("drop", (event) => {
    event.preventDefault();
    if (!event.dataTransfer.files.length) return;
    input.files = event.dataTransfer.files;
    update();
  });
}

/**
 * Reads a grey mask's part ids: says how many names are needed and shows the mask in the result's
 * colours (part k as segment label k) instead of near-black. Palette PNGs are described, not recoloured.
 */
async function describeMask(file, preview) {
  const help = $("#mask-help");
  try {
    const bitmap = await createImageBitmap(file);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(bitmap, 0, 0);
    const image = context.getImageData(0, 0, bitmap.width, bitmap.height);
    const data = image.data;
    let grey = true;
    for (let o = 0; o < data.length && grey; o += 4) grey = data[o] === data[o + 1] && data[o] === data[o + 2];
    if (!grey) {
      help.textContent = `A colour mask (${bitmap.width}×${bitmap.height}): a palette PNG is read by palette ` +
        "index; name one part per index after 0.";
      return;
    }
    const ids = new Set();
    for (let o = 0; o < data.length; o += 4) {
      const id = data[o];
      ids.add(id);
      const [r, g, b] = id === 0 ? BACKGROUND : colour(id - 1);
      data[o] = r;
      data[o + 1] = g;
      data[o + 2] = b;
    }
    context.putImageData(image, 0, 0);
    URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(await canvas.convertToBlob());
    const parts = [...ids].filter((v) => v > 0).sort((a, b) => a - b);
    help.textContent = `Mask ${bitmap.width}×${bitmap.height}, part ids ${parts.join(", ") || "none"}: ` +
      `name ${parts.length ? Math.max(...parts) : 0} part(s), in id order.`;
  } catch {
    help.textContent = "This mask could not be read here; the API will check it.";
  }
}

function pictureOf(input, field, what = "a picture") {
  const file = input.files[0];
  if (!file) throw fieldError(field, `Choose ${what} first (drop it on the box or click it).`);
  return file;
}

// ---------------------------------------------------------------- jobs and progress

/** A training's line: "epoch 3 / 40 · loss 1.234 · best IoU 0.50" (one-shot), "step 2 / 250 · loss …" (concepts). */
function describeTraining(p) {
  const counter = p.epoch != null ? `epoch ${p.epoch} / ${p.epochs}`
    : p.step != null ? `step ${p.step} / ${p.steps}` : null;
  if (!counter) return null;
  const parts = [counter];
  if (p.loss != null) parts.push(`loss ${p.loss.toFixed(3)}`);
  if (p.best_iou != null) parts.push(`best IoU ${p.best_iou.toFixed(2)}`);
  return parts.join(" · ");
}

function describeProgress(job) {
  const p = job.progress || {};
  const training = describeTraining(p);
  switch (job.status) {
    case "queued":
      return "Queued: waiting for a worker…";
    case "running": {
      if (training) return `Training: ${training}`;
      const stage = p.stage && p.stage !== "queued" ? p.stage : "starting";
      return `Running: ${stage} (${Math.round((p.fraction || 0) * 100)}%)`;
    }
    case "succeeded":
      return training ? `Done: ${training}` : "Done.";
    case "canceled":
      return "Canceled.";
    default:
      return `Failed: ${job.error?.message || "unknown error"}`;
  }
}

/** A progress block (bar, text, cancel button) following one job at a time. */
class Progress {
  constructor(element) {
    this.element = element;
    this.bar = $("progress", element);
    this.text = $(".progress-text", element);
    this.cancel = $(".cancel", element);
    this.jobId = null;
    this.cancel.addEventListener("click", async () => {
      if (!this.jobId) return;
      this.cancel.disabled = true;
      this.text.textContent = "Canceling…";
      try {
        await cancelJob(this.jobId);
      } catch (error) {
        this.text.textContent = `Cancel failed: ${error.message}`;
      }
    });
  }

  /** Hidden until a job is accepted: an earlier job's "Done." and full bar must not sit above a new error. */
  reset() {
    this.jobId = null;
    this.element.hidden = true;
    this.bar.value = 0;
    this.text.textContent = "";
    delete this.element.dataset.status;
  }

  start(job) {
    this.jobId = job.id;
    this.element.hidden = false;
    this.cancel.hidden = false;
    this.cancel.disabled = false;
    this.update(job);
  }

  update(job) {
    const fraction = job.progress?.fraction ?? 0;
    this.bar.value = job.status === "succeeded" ? 1 : job.status === "failed" ? 0 : fraction;
    this.text.textContent = describeProgress(job);
    this.element.dataset.status = job.status;
    if (["succeeded", "failed", "canceled"].includes(job.status)) this.cancel.hidden = true;
  }
}

/** Submits, then follows the job; a newer run of the same runner abandons the older one. */
class Runner {
  constructor(form, progress, busyButton) {
    this.form = form;
    this.progress = progress;
    this.button = busyButton;
    this.abort = null;
  }

  async run(submit, onDone) {
    clearErrors(this.form);
    this.abort?.abort();
    this.progress.reset();
    const abort = (this.abort = new AbortController());
    this.button.disabled = true;
    try {
      const job = await submit(abort.signal);
      this.progress.start(job);
      const done = await waitForJob(job.id, (update) => this.progress.update(update), abort.signal);
      if (done.status === "failed") throw new JobFailed(done.error);
      if (done.status === "succeeded") await onDone(done);
    } catch (error) {
      if (error.name !== "AbortError") showError(this.form, error);
    } finally {
      if (this.abort === abort) this.button.disabled = false;
    }
  }

  /** Runs on every submit of the form (which checks nothing itself: novalidate, the API's messages show). */
  onSubmit(submit, onDone) {
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.run(submit, onDone);
    });
  }
}

// ---------------------------------------------------------------- the page

const viewer = new Viewer($(".result"));
const segmentProgress = new Progress($("#segment-progress"));
let resultRunner = null; // the form whose job the result view follows

function fillResolutions() {
  for (const select of document.querySelectorAll("select[data-resolutions]")) {
    for (let r = 256; r <= 1024; r += 64) {
      select.add(new Option(`${r} px`, String(r), false, String(r) === select.dataset.resolutions));
    }
  }
}

function chooseMethod() {
  const method = $("input[name=method]:checked").value;
  $("#segment-form").hidden = method === "oneshot" || method === "referring";
  $("#oneshot").hidden = method !== "oneshot";
  $("#referring").hidden = method !== "referring";
  $("#text-fields").hidden = method !== "text";
  $("#text-params").hidden = method !== "text";
  $("#unsupervised-params").hidden = method !== "unsupervised";
  // Fields that only some text methods read (samples and background words: selfcross; gem has no timestep).
  const textMethod = $("#text-method").value;
  for (const field of document.querySelectorAll("[data-methods]")) {
    field.hidden = !field.dataset.methods.split(" ").includes(textMethod);
  }
  if (method === "oneshot") refreshModels();
  if (method === "referring") refreshConcepts();
}

/** An input's value, or null when it is not shown (a field the chosen method does not read). */
function shownValue(input) {
  return input.closest("[hidden]") ? null : valueOrNull(input);
}

/** Asks /readyz; says what it found in the pill and, for the key, next to the key field. */
async function refreshStatus() {
  const pill = $("#service-status");
  try {
    describeReadiness(await request("readyz"));
  } catch (error) {
    if (error.status === 503 && error.body?.redis !== undefined) describeReadiness(error.body);
    else {
      pill.dataset.state = "down";
      pill.textContent = error.status === 401 ? "Enter the API key" : `Service: ${error.message}`;
    }
  }
}

/** /readyz says what the key sent is worth (`ready.key`): said beside the key field. */
function describeKey(ready) {
  const status = $("#key-status");
  const said = { accepted: "Key accepted", refused: "Key not accepted" }[ready.key] || "";
  status.dataset.state = said ? ready.key : "";
  status.textContent = said;
  if (ready.key === "refused") $("#api-key").setAttribute("aria-invalid", "true");
  else $("#api-key").removeAttribute("aria-invalid");
}

function describeReadiness(ready) {
  const pill = $("#service-status");
  const workers = ready.workers || [];
  describeKey(ready);
  if (!ready.redis) {
    pill.dataset.state = "down";
    pill.textContent = "The job store (Redis) is down";
  } else if (["missing", "refused"].includes(ready.key)) {
    pill.dataset.state = "key";
    pill.textContent = ready.key === "refused" ? "The API key was not accepted: check it"
      : "Keys are on: enter your API key";
  } else if (!("workers" in ready)) {
    // A tenant's key gets the bare verdict: worker details are for operators.
    pill.dataset.state = ready.ready ? "ready" : "waiting";
    pill.textContent = ready.ready ? "Service ready" : "No worker ready: jobs wait in the queue";
  } else if (!workers.length) {
    pill.dataset.state = "waiting";
    pill.textContent = "No worker ready: jobs wait in the queue";
  } else {
    const random = workers.some((w) => w.random_weights);
    pill.dataset.state = random ? "random" : "ready";
    // A model with a note (tiny-colour, tiny-random) is described by it in the banner below.
    pill.textContent = `${workers.length} worker${workers.length > 1 ? "s" : ""} ready · ${workers[0].sd_model}` +
      (random && !workers.some((w) => w.weights_note) ? " (random weights)" : "");
  }
  describeWeights(workers);
  $("#footer-workers").textContent = workers.length ? ` · ${workers.map((w) => `${w.name}: ${w.device}`).join(", ")}`
    : "";
}

/** Says plainly what a local test or demo model is (its weights_note), so its masks are read for what they are. */
function describeWeights(workers) {
  const note = $("#model-note");
  const noted = workers.find((w) => w.weights_note);
  note.hidden = !noted;
  note.replaceChildren();
  if (!noted) return;
  const name = document.createElement("strong");
  name.textContent = `${noted.sd_model}: `;
  note.append(name, noted.weights_note);
}

const RESULT_TITLES = { unsupervised: "DiffSeg", oneshot_segment: "one-shot", referring: "referring" };

async function showResult(job, file) {
  const picture = await createImageBitmap(file);
  viewer.show(job, picture);
  $("#result-title").textContent = `Result · ${job.kind === "text" ? job.params.method : RESULT_TITLES[job.kind]}`;
}

/** The result view follows one runner: starting the other one abandons the first. */
function startResult(runner) {
  if (resultRunner !== runner) resultRunner?.abort?.abort();
  resultRunner = runner;
  viewer.clear();
  // One column (phones): the result is below the form; bring its progress into view.
  if (window.matchMedia("(max-width: 860px)").matches) $(".result").scrollIntoView({ block: "start" });
}

// A chosen File -> the id the API gave its picture (result.image.id): asking again about the same
// file (other classes or parameters) sends the id, not the bytes.
const storedPictures = new WeakMap();

/** POSTs a segmentation of `sent.file`: by its stored picture's id when known, else (or once that has expired) uploaded. */
async function postPicture(sent, signal) {
  const post = (files, fields) => request(sent.path, { method: "POST", body: formData(files, fields), signal });
  const id = storedPictures.get(sent.file);
  if (id) {
    try {
      return await post([], { ...sent.fields, image_id: id });
    } catch (error) {
      if (error.status !== 404 || error.field !== "image_id") throw error;
      storedPictures.delete(sent.file); // expired from the store: send the picture again
    }
  }
  return post([["image", sent.file]], sent.fields);
}

/**
 * A form whose job segments one picture. describe() checks the form and says what to send
 * ({ path, file, fields }); the result view then follows this form's job and draws it over that picture.
 */
function segmentOnSubmit(form, button, describe) {
  const runner = new Runner(form, segmentProgress, button);
  let sent; // the latest run's: a newer run abandons the older one
  runner.onSubmit(async (signal) => {
    sent = describe();
    startResult(runner);
    return postPicture(sent, signal);
  }, (job) => {
    if (job.result?.image?.id) storedPictures.set(sent.file, job.result.image.id);
    return showResult(job, sent.file);
  });
}

// Unsupervised and text
segmentOnSubmit($("#segment-form"), $("#segment-submit"), () => {
  const text = $("input[name=method]:checked").value === "text";
  const file = pictureOf($("#picture"), "image");
  const common = { resolution: $("#resolution").value, seed: valueOrNull($("#seed")) };
  if (text) {
    const classes = words($("#classes").value);
    if (!classes.length) throw fieldError("classes", "Name at least one class, e.g. “dog, grass”.");
    return { path: "segment/text", file, fields: { ...common, classes, method: $("#text-method").value,
      background: $("#background").checked, background_words: words(shownValue($("#background_words")) || ""),
      samples: shownValue($("#samples")), timestep: shownValue($("#t-timestep")) } };
  }
  return { path: "segment/unsupervised", file, fields: { ...common, kl_threshold: $("#kl_threshold").value,
    grid: $("#grid").value, iterations: $("#iterations").value, timestep: $("#u-timestep").value,
    refine: $("#refine").checked, vocabulary: words($("#vocabulary").value) } };
});

// One-shot: training
new Runner($("#train-form"), new Progress($("#train-progress")), $("#train-submit")).onSubmit(async (signal) => {
  const image = pictureOf($("#train-image"), "images");
  const mask = pictureOf($("#train-mask"), "masks", "its mask");
  const labels = words($("#labels").value);
  if (!labels.length) throw fieldError("labels", "Name the parts: one name per mask id, e.g. “wheel, window”.");
  // JSON with typed numbers: the API refuses a multipart crops_per_side ("1" is not the literal 1).
  const seed = valueOrNull($("#train-seed"));
  const body = { images_base64: [await dataUrl(image)], masks_base64: [await dataUrl(mask)], labels,
    ...(valueOrNull($("#model-name")) === null ? {} : { name: valueOrNull($("#model-name")) }),
    epochs: Number($("#epochs").value), learning_rate: Number($("#learning_rate").value),
    crops_per_side: Number($("#crops_per_side").value), resolution: Number($("#train-resolution").value),
    ...(seed === null ? {} : { seed: Number(seed) }) };
  const job = await request("oneshot/train", { method: "POST", json: body, signal });
  await refreshModels(job.model_id);
  return job;
}, () => refreshModels($("#model").value));

// One-shot: models and segmenting with one
let knownModels = new Map(); // id -> the API's model, as last listed

/** The chosen model in full under the list (a long name would be cut in the list itself). */
function describeModel() {
  const model = knownModels.get($("#model").value);
  $("#model-info").textContent = model ? `${model.name} · parts: ${model.labels.slice(1).join(", ")}` +
    `${model.description ? ` · ${model.description}` : ""} · id ${model.id}` : "";
}

async function refreshModels(select = null) {
  const list = $("#model");
  const keep = select || list.value;
  try {
    const { models } = await request("oneshot?limit=100");
    knownModels = new Map(models.map((model) => [model.id, model]));
    const options = models.map((model) => {
      const iou = model.metrics?.train_iou;
      const state = model.status === "ready" && iou != null ? `ready, IoU ${iou.toFixed(2)}` : model.status;
      return new Option(`${model.name} (${state})`, model.id, false, model.id === keep);
    });
    list.replaceChildren(...(options.length ? options : [new Option("No model yet", "")]));
    describeModel();
  } catch (error) {
    if (error.status !== 401) showError($("#oneshot-segment-form"), error);
  }
}

/** A Delete button next to a list: deletes the record chosen in it (`collection`/{id}), then lists again. */
function deleteChosen(button, list, collection, refresh) {
  button.addEventListener("click", async () => {
    const id = list.value;
    clearErrors(button.form);
    if (!id) return;
    try {
      await request(`${collection}/${encodeURIComponent(id)}`, { method: "DELETE" });
      await refresh();
    } catch (error) {
      showError(button.form, error);
    }
  });
}

$("#models-refresh").addEventListener("click", () => refreshModels());
$("#model").addEventListener("change", describeModel);
deleteChosen($("#model-delete"), $("#model"), "oneshot", refreshModels);

segmentOnSubmit($("#oneshot-segment-form"), $("#oneshot-segment-submit"), () => {
  const id = $("#model").value;
  if (!id) throw fieldError("model", "Train a model first (step 1), or pick one.");
  const file = pictureOf($("#oneshot-picture"), "image");
  return { path: `oneshot/${encodeURIComponent(id)}/segment`, file, fields: {} };
});

// Find my object: teaching a concept
new Runner($("#concept-train-form"), new Progress($("#concept-progress")), $("#concept-train-submit"))
  .onSubmit(async (signal) => {
    const photos = [...$("#concept-photos").files];
    if (!photos.length) throw fieldError("images", "Choose 3 to 20 photos of your object first (drop them or click).");
    const masks = [...$("#concept-masks").files];
    const files = [...photos.map((photo) => ["images", photo]), ...masks.map((mask) => ["masks", mask])];
    const fields = { identifier: valueOrNull($("#concept-identifier")), name: valueOrNull($("#concept-name")),
      class_word: valueOrNull($("#concept-class-word")), train_kv: $("#concept-method").value,
      steps: valueOrNull($("#concept-steps")), learning_rate: valueOrNull($("#concept-learning-rate")),
      batch_size: valueOrNull($("#concept-batch-size")), num_vectors: valueOrNull($("#concept-vectors")),
      resolution: $("#concept-resolution").value, seed: valueOrNull($("#concept-seed")) };
    const job = await request("concepts/train", { method: "POST", body: formData(files, fields), signal });
    // Listed (and selected) at once: a query may name a concept still training, its job then waits.
    await refreshConcepts(job.concept_id);
    return job;
  }, (job) => refreshConcepts(job.concept_id));

// Find my object: concepts and finding one
let knownConcepts = new Map(); // id -> the API's concept, as last listed

/** Fills the class word and queries from the chosen concept: "<my-mug> mug" finds it among mugs. */
function prefillQueries() {
  const concept = knownConcepts.get($("#concept").value);
  if (!concept) return;
  $("#referring-class-word").value = concept.class_word;
  $("#queries").value = `<${concept.identifier}> ${concept.class_word}`;
}

/** The chosen concept in full under the list: its name, how queries write it, its note. */
function describeConcept() {
  const concept = knownConcepts.get($("#concept").value);
  $("#concept-info").textContent = concept ? `${concept.name} · <${concept.identifier}> ${concept.class_word}` +
    `${concept.description ? ` · ${concept.description}` : ""}` : "";
}

async function refreshConcepts(select = null) {
  const list = $("#concept");
  const before = list.value;
  const keep = select || before;
  try {
    const { concepts } = await request("concepts?limit=100");
    knownConcepts = new Map(concepts.map((concept) => [concept.id, concept]));
    const options = concepts.map((concept) => new Option(`${concept.name} (${concept.status})`, concept.id, false,
      concept.id === keep));
    list.replaceChildren(...(options.length ? options : [new Option("No object yet", "")]));
    describeConcept();
    if (list.value !== before) prefillQueries();
  } catch (error) {
    if (error.status !== 401) showError($("#referring-form"), error);
  }
}

$("#concept").addEventListener("change", () => {
  describeConcept();
  prefillQueries();
});
$("#concepts-refresh").addEventListener("click", () => refreshConcepts());
deleteChosen($("#concept-delete"), $("#concept"), "concepts", refreshConcepts);

segmentOnSubmit($("#referring-form"), $("#referring-submit"), () => {
  const file = pictureOf($("#referring-picture"), "image");
  const queries = $("#queries").value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (!queries.length) throw fieldError("queries", "Write at least one query, e.g. “<my-mug> mug” or “a red mug”.");
  return { path: "segment/referring", file, fields: { class_word: valueOrNull($("#referring-class-word")), queries,
    max_instances: $("#max-instances").value, timestep: $("#referring-timestep").value,
    resolution: $("#referring-resolution").value, seed: valueOrNull($("#referring-seed")) } };
});

// The API key
// The API key: kept on every change (a request sent before pressing "Use" has it), checked on "Use".
const keyInput = $("#api-key");
keyInput.value = getApiKey();
keyInput.addEventListener("change", () => setApiKey(keyInput.value.trim()));
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(keyInput.value.trim());
  refreshStatus(); // says "Key accepted" or "Key not accepted" next to the field
  if (!$("#oneshot").hidden) refreshModels();
  if (!$("#referring").hidden) refreshConcepts();
});

for (const radio of document.querySelectorAll("input[name=method]")) radio.addEventListener("change", chooseMethod);
$("#text-method").addEventListener("change", chooseMethod);
for (const zone of document.querySelectorAll("[data-drop]")) setupDrop(zone);
fillResolutions();
chooseMethod();
refreshStatus();
document.documentElement.dataset.ready = "true"; // the page's modules have loaded (tests wait on it)
