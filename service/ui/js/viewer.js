// The result view: the picture on a canvas with the job's masks blended over it, a legend whose
// entries toggle segments, hover names, and downloads (the job's JSON, the drawn PNG).
import { labelMap } from "./rle.js";

export const BACKGROUND = [128, 128, 128];

/** "1 segment", "2 segments". */
export function count(number, noun) {
  return `${number} ${noun}${number === 1 ? "" : "s"}`;
}

const WHITE = [255, 255, 255];

/** Colour i of n: golden-angle hues (as service/overlay.py), [r, g, b] in 0..255. */
export function colour(i) {
  const h = (i * 0.61803398875) % 1;
  const s = 200 / 255;
  const v = 235 / 255;
  const k = (n) => (n + h * 6) % 6;
  const f = (n) => v - v * s * Math.max(0, Math.min(k(n), 4 - k(n), 1));
  return [f(5), f(3), f(1)].map((c) => Math.round(c * 255));
}

/**
 * Each segment's legend name and colour. Named classes keep their colour across pictures (and the
 * one-shot mask preview). A labelled result's unlabelled segments (referring: the class's other
 * instances) are numbered after its labels, as the client's label maps number them; else by order.
 */
function describeSegments(job) {
  const { segments, labels } = job.result;
  let others = 0;
  return segments.map((segment, index) => {
    if (segment.label_id === 0) return { name: segment.label, colour: BACKGROUND };
    if (segment.label_id != null) return { name: segment.label, colour: colour(segment.label_id - 1) };
    if (labels) {
      others += 1;
      return { name: `other ${job.params.class_word} ${others}`, colour: colour(labels.length + others - 2) };
    }
    return { name: segment.label ?? `segment ${segment.id}`, colour: colour(index) };
  });
}

export class Viewer {
  constructor(root) {
    this.canvas = root.querySelector("#canvas");
    this.context = this.canvas.getContext("2d", { willReadFrequently: true });
    this.empty = root.querySelector("#empty");
    this.legend = root.querySelector("#legend");
    this.legendHead = root.querySelector("#legend-head");
    this.hoverLabel = root.querySelector("#hover-label");
    this.meta = root.querySelector("#result-meta");
    this.opacity = root.querySelector("#opacity");
    this.jsonButton = root.querySelector("#download-json");
    this.pngButton = root.querySelector("#download-png");
    this.job = null;
    this.hovered = -1;

    this.opacity.addEventListener("input", () => this.render());
    root.querySelector("#show-all").addEventListener("click", () => this.setAll(true));
    root.querySelector("#show-none").addEventListener("click", () => this.setAll(false));
    this.canvas.addEventListener("pointermove", (event) => this.hover(this.segmentAt(event)));
    this.canvas.addEventListener("pointerleave", () => this.hover(-1));
    this.canvas.addEventListener("click", (event) => {
      const index = this.segmentAt(event);
      if (index >= 0) this.toggle(index, !this.visible[index]);
    });
    this.jsonButton.addEventListener("click", () => this.downloadJson());
    this.pngButton.addEventListener("click", () => this.downloadPng());
  }

  /** Clears the view (a new request started). */
  clear() {
    this.job = null;
    this.canvas.hidden = true;
    this.empty.hidden = false;
    this.legend.replaceChildren();
    this.legendHead.hidden = true;
    this.meta.textContent = "";
    this.hoverLabel.textContent = "\u00a0";
    this.jsonButton.disabled = true;
    this.pngButton.disabled = true;
  }

  /** Shows a succeeded job's segments over `picture` (an ImageBitmap of the file that was sent). */
  show(job, picture) {
    const { width, height } = job.result.image;
    this.job = job;
    this.segments = job.result.segments;
    this.labels = labelMap(this.segments, height, width);
    const described = describeSegments(job);
    this.names = described.map((d) => d.name);
    this.colours = described.map((d) => d.colour);
    this.visible = this.segments.map(() => true);
    this.canvas.width = width;
    this.canvas.height = height;
    this.canvas.style.setProperty("--aspect", String(width / height));
    // The API's masks are in the picture's grid after EXIF orientation, as the browser decodes it.
    this.context.drawImage(picture, 0, 0, width, height);
    this.base = this.context.getImageData(0, 0, width, height);
    this.canvas.hidden = false;
    this.empty.hidden = true;
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", `The picture with ${count(this.segments.length, "segment")} drawn over it`);
    this.buildLegend(width * height);
    const timings = job.result.timings_ms || {};
    const seconds = ((timings.inference || 0) / 1000).toFixed(1);
    const instances = job.result.instances == null ? "" : `${count(job.result.instances, "instance")} · `;
    // Labels asked for that no segment has (a class absent, a query left without an instance) are named.
    const found = new Set(this.segments.map((segment) => segment.label_id));
    const missing = (job.result.labels || []).filter((_, labelId) => labelId > 0 && !found.has(labelId));
    this.meta.textContent = `${count(this.segments.length, "segment")} · ${instances}${width}×${height} px · ` +
      `${seconds} s inference · seed ${job.params.seed}` +
      (missing.length ? ` · not found: ${missing.join(", ")}` : "") +
      (job.result.random_weights ? " · random weights (tiny-random): the masks mean nothing" : "");
    this.jsonButton.disabled = false;
    this.pngButton.disabled = false;
    this.render();
  }

  buildLegend(pixels) {
    const items = this.segments.map((segment, index) => {
      const item = document.createElement("li");
      item.dataset.index = String(index);
      const id = `segment-toggle-${index}`;
      const box = document.createElement("input");
      box.type = "checkbox";
      box.id = id;
      box.checked = true;
      box.addEventListener("change", () => this.toggle(index, box.checked));
      const label = document.createElement("label");
      label.htmlFor = id;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = `rgb(${this.colours[index].join(",")})`;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = this.names[index];
      label.append(swatch, name);
      const facts = document.createElement("span");
      facts.className = "facts";
      const share = ((100 * segment.area) / pixels).toFixed(1);
      facts.textContent = segment.score == null ? `${share}%` : `${share}% · score ${segment.score.toFixed(2)}`;
      item.append(box, label, facts);
      item.addEventListener("pointerenter", () => this.hover(index));
      item.addEventListener("pointerleave", () => this.hover(-1));
      return item;
    });
    this.legend.replaceChildren(...items);
    this.legendHead.hidden = false;
  }

  toggle(index, visible) {
    this.visible[index] = visible;
    const box = this.legend.querySelector(`#segment-toggle-${index}`);
    if (box) box.checked = visible;
    this.legend.children[index]?.classList.toggle("off", !visible);
    this.render();
  }

  setAll(visible) {
    this.segments?.forEach((_, index) => this.toggle(index, visible));
  }

  segmentAt(event) {
    if (!this.job) return -1;
    const box = this.canvas.getBoundingClientRect();
    const x = Math.floor(((event.clientX - box.left) / box.width) * this.canvas.width);
    const y = Math.floor(((event.clientY - box.top) / box.height) * this.canvas.height);
    if (x < 0 || y < 0 || x >= this.canvas.width || y >= this.canvas.height) return -1;
    return this.labels[y * this.canvas.width + x];
  }

  hover(index) {
    if (index === this.hovered || !this.job) return;
    this.hovered = index;
    for (const item of this.legend.children) item.classList.toggle("hovered", Number(item.dataset.index) === index);
    this.hoverLabel.textContent = index >= 0
      ? `${this.names[index]}${this.visible[index] ? "" : " (hidden)"} · click to toggle`
      : "\u00a0";
    this.render();
  }

  /** Blends every visible segment's colour over the picture, outlines segment borders, hovered stronger. */
  render() {
    if (!this.job) return;
    const { width, height } = this.canvas;
    const out = new ImageData(new Uint8ClampedArray(this.base.data), width, height);
    const pixels = out.data;
    const alpha = Number(this.opacity.value) / 100;
    const strong = Math.min(1, alpha + 0.25);
    const labels = this.labels;
    const last = labels.length;
    for (let p = 0; p < last; p++) {
      const index = labels[p];
      if (index < 0 || !this.visible[index]) continue;
      // A border pixel's right or lower neighbour belongs to another segment: drawn near-white.
      const border = ((p + 1) % width !== 0 && labels[p + 1] !== index)
        || (p + width < last && labels[p + width] !== index);
      const paint = border ? WHITE : this.colours[index];
      const a = border ? 0.9 : index === this.hovered ? strong : alpha;
      const o = p * 4;
      pixels[o] += (paint[0] - pixels[o]) * a;
      pixels[o + 1] += (paint[1] - pixels[o + 1]) * a;
      pixels[o + 2] += (paint[2] - pixels[o + 2]) * a;
    }
    this.context.putImageData(out, 0, 0);
  }

  downloadJson() {
    const blob = new Blob([JSON.stringify(this.job, null, 2)], { type: "application/json" });
    save(blob, `attnseg-${this.job.kind}-${this.job.id}.json`);
  }

  downloadPng() {
    this.canvas.toBlob((blob) => save(blob, `attnseg-${this.job.kind}-${this.job.id}.png`), "image/png");
  }
}

function save(blob, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
