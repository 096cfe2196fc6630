// Submit form with a preflight preview (POST /v1/inspect reads the source's headers only).
"use strict";

(() => {
  const R = Recast;
  const { api, el, showError } = R;
  const $ = (id) => document.getElementById(id);
  const form = $("job-form");
  const previewBody = $("preview-body");
  const hint = $("preview-hint");
  let toTouched = false;
  let lastBody = null;
  let idempotencyKey = R.randomKey();
  let previewSeq = 0;
  let lastPreviewed = null;
  let lastInfo = null;

  R.fillAdapters($("adapter"));
  $("to").addEventListener("change", () => { toTouched = true; describeOutcome(); });
  for (const id of ["quantize", "dtype"]) $(id).addEventListener("change", () => describeOutcome());

  function value(id) {
    return $(id).value.trim();
  }

  function previewRequest() {
    const body = { source: value("source"), dtype: $("dtype").value };
    if (value("adapter")) body.adapter = value("adapter");
    if (value("source_credential")) body.source_credential = value("source_credential");
    return body;
  }

  async function preview(force) {
    const body = previewRequest();
    if (!body.source) {
      hint.hidden = false;
      previewBody.replaceChildren();
      return;
    }
    const key = JSON.stringify(body);
    if (!force && key === lastPreviewed) return;
    lastPreviewed = key;
    const seq = ++previewSeq;
    hint.hidden = true;
    previewBody.replaceChildren(el("p", { class: "muted", text: "Reading the checkpoint's headers…" }));
    try {
      const info = await api("POST", "/v1/inspect", body);
      if (seq !== previewSeq) return;
      lastInfo = info;
      if (!toTouched && info.conversion && info.conversion.to) $("to").value = info.conversion.to;
      showPreview(info);
    } catch (err) {
      if (seq !== previewSeq) return;
      lastInfo = null;
      lastPreviewed = null;
      previewBody.replaceChildren(el("div", { class: "alert error", id: "preview-error", text: R.problemText(err) }));
    }
  }

  function fact(dl, name, value) {
    dl.append(el("dt", { text: name }), el("dd", {}, value instanceof Node ? value : String(value ?? "—")));
  }

  function showPreview(info) {
    const q = info.quantization || {};
    const dl = el("dl", { class: "facts", id: "preview-facts" });
    fact(dl, "Source", el("span", { class: "mono", text: info.source }));
    fact(dl, "Format", info.format === "native" ? "native (NeMo AutoModel)" : "hf (Hugging Face safetensors)");
    fact(dl, "Adapter", el("strong", { id: "preview-adapter", text: info.adapter }));
    fact(dl, "Layout", info.layout || "—");
    fact(dl, "Architectures", (info.architectures || []).join(", ") || "—");
    let quant = "none (high precision)";
    if (q.quantized_tensors) {
      quant = q.quantized_tensors + " quantized tensors · " + (q.schemes || []).join(", ") +
        (q.block_size ? " " + q.block_size.join("×") : "") + (q.activation_scheme ? " · " + q.activation_scheme + " activations" : "");
    }
    fact(dl, "Quantization", el("span", { id: "preview-quantization", text: quant }));
    fact(dl, "Size", el("span", { id: "preview-size",
      text: R.bytes(info.bytes) + " in " + info.shards + " shards, " + info.tensors + " tensors (largest shard " +
        R.bytes(info.largest_shard_bytes) + ")" }));
    if ((info.carried_files || []).length) fact(dl, "Carried over", info.carried_files.join(", "));
    previewBody.replaceChildren(dl, el("div", { class: "outcome", id: "preview-outcome" }));
    describeOutcome();
  }

  // What the job will write, from the preview and the form's current choices.
  function describeOutcome() {
    const box = $("preview-outcome");
    if (!box || !lastInfo) return;
    const info = lastInfo;
    const c = info.conversion || {};
    const to = $("to").value;
    const dtype = $("dtype").value;
    const quantize = $("quantize").value;
    let what;
    if (info.format === "hf" && to === "native") {
      what = "NeMo AutoModel native checkpoint: FP8 weights dequantized to " + dtype +
        " (other tensors keep their dtype), keys renamed for " + info.adapter + ", about " + R.bytes(c.output_bytes) + ".";
    } else if (info.format === "native" && to === "hf") {
      what = {
        keep: "Hugging Face safetensors re-quantized with the recorded scales: byte-identical to the original if the weights are unmodified.",
        none: "Hugging Face safetensors in high precision (no FP8).",
        "per-tensor": "Hugging Face safetensors, FP8 with fresh per-tensor scales (amax/448).",
        block: "Hugging Face safetensors, FP8 with fresh 128×128 block scales (amax/448).",
      }[quantize];
    } else if (info.format === "hf" && to === "hf") {
      what = {
        keep: "A copy of the Hugging Face checkpoint as it is.",
        none: "Hugging Face safetensors dequantized to " + dtype + ".",
        "per-tensor": "Hugging Face safetensors (re)quantized to FP8 with per-tensor scales.",
        block: "Hugging Face safetensors (re)quantized to FP8 with 128×128 block scales.",
      }[quantize];
    } else {
      what = "The source is already native; convert it to hf.";
    }
    box.replaceChildren(
      el("strong", { text: info.format + " → " + to }), " ", el("span", { id: "preview-output", text: what }),
      el("div", { class: "sub", text: "Needs about " + R.bytes(c.disk_bytes_needed) + " of disk at the target and " +
        R.bytes(c.peak_host_memory_bytes) + " peak host memory per worker; verified after conversion" +
        ($("verify").checked ? "." : " (verification is off).") }));
  }

  $("preview-button").addEventListener("click", () => preview(true));
  $("source").addEventListener("change", () => preview(false));
  $("adapter").addEventListener("change", () => { if (value("source")) preview(false); });
  $("dtype").addEventListener("change", () => { if (value("source")) preview(false); });
  $("verify").addEventListener("change", () => describeOutcome());

  function jobRequest() {
    const body = {
      source: value("source"),
      target: value("target"),
      to: $("to").value,
      dtype: $("dtype").value,
      quantize: $("quantize").value,
      verify: $("verify").checked,
      labels: R.parseLabels($("labels").value),
    };
    for (const id of ["adapter", "source_credential", "target_credential", "commit_message"]) {
      if (value(id)) body[id] = value(id);
    }
    if ($("create_pr").checked) body.create_pr = true;
    return body;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const errorBox = $("submit-error");
    let body;
    try {
      body = jobRequest();
    } catch (err) {
      showError(errorBox, err.message);
      return;
    }
    if (!body.source || !body.target) {
      showError(errorBox, "Source and target are required.");
      return;
    }
    // The same request retried (say after a lost response) reuses its key, so it cannot queue twice.
    const text = JSON.stringify(body);
    if (text !== lastBody) {
      idempotencyKey = R.randomKey();
      lastBody = text;
    }
    const button = $("submit-button");
    button.disabled = true;
    try {
      const job = await api("POST", "/v1/jobs", body, { "Idempotency-Key": idempotencyKey });
      location.assign("/jobs/" + encodeURIComponent(job.id));
    } catch (err) {
      showError(errorBox, err);
      button.disabled = false;
    }
  });
})();
