// The web console: sign in with an API key; jobs (list, submit with the estimate shown first, cancel, pause,
// resume); a job's page with live curves from its event stream, per-step status, checkpoints and rollouts; a
// chat playground; and one job's SFT, RLHF and EMA models side by side, each reply scored by its reward model.
// Pages are hash routes (#/jobs, #/jobs/ID, #/new, #/chat, #/compare, #/evals, #/evals/ID): the server serves static files only.
// Text from the server (model replies, prompts, names) is only ever set as text, never as HTML.
import "./style.css";
import { ApiError, all, api, key, stream, whenSignedOut } from "./api.js";
import { Curves, STEP_NAMES, order } from "./charts.js";

const app = document.getElementById("app");
let leave = () => {}; // stops the current page's timers and streams

// ------------------------------------------------------------------------------------------- helpers

/** An element: h("td", {class: "x", onclick: f}, "text", child, …). Strings become text nodes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

// "2×" on one node, "2 nodes × 8 (16)" across nodes
const gpus = (total, nodes) => (nodes > 1 ? `${nodes} nodes × ${total / nodes} (${total})` : `${total}×`);

const fmt = {
  usd: (x) => (x === null || x === undefined ? "–" : `$${x < 0.01 && x > 0 ? x.toFixed(4) : x.toFixed(2)}`),
  pct: (x) => `${Math.round((x || 0) * 100)}%`,
  time: (t) => (t ? new Date(t * 1000).toLocaleString() : "–"),
  num: (x) => (typeof x === "number" ? (Math.abs(x) >= 100 || x === Math.round(x) ? String(Math.round(x * 100) / 100) : x.toPrecision(4)) : String(x ?? "–")),
  secs: (s) => (s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`),
};

function errorBox(e) {
  return h("div", { class: "error", role: "alert" }, e instanceof Error ? e.message : String(e));
}

function statusBadge(status) {
  return h("span", { class: `badge ${status}`, dataset: { status } }, status);
}

const ACTIONS = { cancel: ["queued", "running", "paused", "validating_files"], pause: ["queued", "running"], resume: ["paused"] };

function jobActions(job, after) {
  return h("span", { class: "actions" },
    Object.entries(ACTIONS).filter(([, when]) => when.includes(job.status)).map(([action]) =>
      h("button", {
        class: `small ${action === "cancel" ? "danger" : ""}`, dataset: { action },
        onclick: async (ev) => {
          ev.preventDefault();
          ev.target.disabled = true;
          try {
            await api(`/v1/fine_tuning/jobs/${job.id}/${action}`, { method: "POST" });
          } catch (e) {
            alert(e.message);
          }
          after();
        },
      }, action)));
}

// ------------------------------------------------------------------------------------------- sign-in

function signIn(message) {
  leave();
  leave = () => {};
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "sk-…", required: true });
  const note = h("div", { id: "sign-in-message", class: message ? "error" : "hint", role: "alert" },
    message || "Your API key stays in this tab only (session storage); closing the tab signs you out.");
  const form = h("form", {
    id: "sign-in", class: "card narrow",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const k = input.value.trim();
      try {
        await api("/v1/models", { apiKey: k });
        key.set(k);
        location.hash = "#/jobs";
        route();
      } catch (e) {
        note.className = "error";
        note.textContent = e instanceof ApiError && e.status === 401
          ? `That key was not accepted: ${e.message}. Check it, or ask an operator for one (rlhf keys create).`
          : `Could not sign in: ${e.message}`;
      }
    },
  }, h("h1", {}, "rlhf-service"), h("label", { for: "api-key" }, "API key"), input, h("button", { type: "submit" }, "Sign in"), note);
  app.replaceChildren(form);
  input.focus();
}

whenSignedOut((message) => signIn(message));

function frame(active, ...content) {
  const link = (href, label) => h("a", { href, class: active === href ? "active" : "" }, label);
  return h("div", { class: "frame" },
    h("nav", {}, h("strong", {}, "rlhf-service"), link("#/jobs", "Jobs"), link("#/new", "New job"),
      link("#/chat", "Chat"), link("#/compare", "Compare"), link("#/evals", "Evals"),
      h("a", { href: "#/", id: "sign-out", onclick: (ev) => { ev.preventDefault(); key.clear(); signIn(); } }, "Sign out")),
    h("main", {}, ...content));
}

// ------------------------------------------------------------------------------------------- jobs

function jobsPage() {
  const body = h("tbody");
  const table = h("table", { id: "jobs" },
    h("thead", {}, h("tr", {}, ["Job", "Model", "Method", "Status", "Step", "Progress", "Cost so far", "Estimate", "Created", ""].map((t) => h("th", {}, t)))),
    body);
  const msg = h("div");
  app.replaceChildren(frame("#/jobs", h("h2", {}, "Fine-tuning jobs"), msg, table));
  let timer;
  const load = async () => {
    try {
      const jobs = (await api("/v1/fine_tuning/jobs", { params: { limit: 50 } })).data;
      msg.replaceChildren(jobs.length ? "" : h("p", { class: "hint" }, "No jobs yet: ", h("a", { href: "#/new" }, "submit one"), "."));
      body.replaceChildren(...jobs.map((j) => h("tr", { dataset: { job: j.id } },
        h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)),
        h("td", {}, j.model),
        h("td", {}, j.method?.type || "supervised"),
        h("td", {}, statusBadge(j.status)),
        h("td", {}, j.current_step ? `${j.current_step} of [${j.steps.join(", ")}]` : `[${j.steps.join(", ")}]`),
        h("td", {}, h("progress", { max: 1, value: j.progress }), " ", fmt.pct(j.progress),
          j.phase ? h("div", { class: "hint phase" }, j.phase.description) : null),
        h("td", {}, fmt.usd(j.cost.accrued_usd)),
        h("td", {}, fmt.usd(j.cost.estimated_usd)),
        h("td", {}, fmt.time(j.created_at)),
        h("td", {}, jobActions(j, load)))));
    } catch (e) {
      msg.replaceChildren(errorBox(e));
    }
  };
  load();
  timer = setInterval(load, 3000);
  return () => clearInterval(timer);
}

// ------------------------------------------------------------------------------------------- one job

function jobPage(id) {
  const ctl = new AbortController();
  const head = h("div", { id: "job-head" });
  const curvesRoot = h("div", { id: "curves" });
  const curves = new Curves(curvesRoot);
  const ckptBody = h("tbody");
  const rollBody = h("tbody");
  const eventsList = h("ol", { id: "events", class: "events" });
  const live = h("span", { id: "live", class: "hint" }, "connecting…");
  app.replaceChildren(frame("", head,
    h("h3", {}, "Curves ", live), curvesRoot,
    h("h3", {}, "Checkpoints"),
    h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ["Step", "At step", "Model", "Metrics", "Saved"].map((t) => h("th", {}, t)))), ckptBody),
    h("h3", {}, "Sampled rollouts (latest 20)"),
    h("table", { id: "rollouts" }, h("thead", {}, h("tr", {}, ["#", "Prompt", "Answer", "Reward", "KL", "Grader"].map((t) => h("th", {}, t)))), rollBody),
    h("h3", {}, "Events"), eventsList));

  let job = null;
  const showJob = (j) => {
    job = j;
    head.replaceChildren(
      h("h2", {}, `Job ${j.id} `, statusBadge(j.status), " ", jobActions(j, () => refreshJob(true))),
      h("dl", { class: "facts" },
        h("dt", {}, "Model"), h("dd", {}, j.model),
        h("dt", {}, "Method"), h("dd", {}, j.method?.type || "supervised"),
        h("dt", {}, "Reward model"), h("dd", {}, j.reward_model || "–"),
        h("dt", {}, "Fine-tuned model"), h("dd", { id: "fine-tuned-model" }, j.fine_tuned_model || "–"),
        h("dt", {}, "Progress"), h("dd", {}, h("progress", { max: 1, value: j.progress }), " ", fmt.pct(j.progress)),
        // what the running step does now, so that "running, 0%" never hides a wait
        h("dt", {}, "Now"), h("dd", { id: "phase", title: j.phase ? `ended and retried if it makes no progress for ${Math.round(j.phase.bound_s)} s` : "" },
          j.phase ? j.phase.description : "–"),
        h("dt", {}, "Cost"), h("dd", {}, `${fmt.usd(j.cost.accrued_usd)} so far of ${fmt.usd(j.cost.estimated_usd)} estimated (${gpus(j.num_gpus, j.nodes)} ${j.gpu_type})`),
        h("dt", {}, "Steps"), h("dd", { id: "step-status" }, j.steps.map((s) => h("span", { class: "step" },
          `${STEP_NAMES[s] || `Step ${s}`}: `, statusBadge(j.step_status[String(s)] || "pending")))),
        j.error ? [h("dt", {}, "Error"), h("dd", { class: "error" }, j.error.message)] : null));
  };
  const refreshJob = async (reconnect = false) => {
    try {
      const j = await api(`/v1/fine_tuning/jobs/${id}`);
      const wasLive = job && ["queued", "running", "validating_files"].includes(job.status);
      showJob(j);
      if (reconnect && !wasLive && ["queued", "running"].includes(j.status)) follow(); // resumed: watch again
    } catch (e) {
      head.replaceChildren(errorBox(e));
    }
  };
  const loadCheckpoints = async () => {
    const ckpts = await all(`/v1/fine_tuning/jobs/${id}/checkpoints`, { max: 200 });
    if (!ckpts.length) return ckptBody.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "hint" }, "none yet: each step lists its checkpoints and its final model")));
    ckptBody.replaceChildren(...ckpts.map((c) => h("tr", {},
      h("td", {}, String(c.step)), h("td", {}, String(c.step_number)),
      h("td", {}, c.fine_tuned_model_checkpoint + (c.metrics?.final ? " (final)" : "")),
      h("td", { class: "mono" }, order(Object.keys(c.metrics || {}).filter((k) => typeof c.metrics[k] === "number" && !["time", "step", "epoch"].includes(k)))
        .slice(0, 4).map((k) => `${k} ${fmt.num(c.metrics[k])}`).join(" · ")),
      h("td", {}, fmt.time(c.created_at)))));
  };
  // a graded answer: each part's score, what each judge replied, and the flags of what could not be graded
  const graded = (r) => h("td", { class: "text grader" },
    ...Object.entries(r.grades || {}).map(([k, v]) => h("div", { class: "mono" }, `${k} ${fmt.num(v)}`)),
    ...(r.judges || []).map((j) => h("div", { "data-judge": j.grader },
      `${j.grader} (${j.model}): ${j.text == null ? `no reply: ${j.error}` : JSON.stringify(j.text)}`)),
    ...Object.keys(r.errors || {}).map((e) => h("div", { class: "flag", title: r.errors[e] || "" }, e)));
  const loadRollouts = async () => {
    const rows = (await all(`/v1/fine_tuning/jobs/${id}/rollouts`, { max: 5000 })).slice(-20).reverse();
    if (!rows.length) return rollBody.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "hint" }, "none yet: step 3 samples its rollouts here")));
    rollBody.replaceChildren(...rows.map((r) => h("tr", {},
      h("td", {}, String(r.id)), h("td", { class: "text" }, String(r.prompt ?? "")), h("td", { class: "text" }, String(r.answer ?? "")),
      h("td", {}, fmt.num(r.reward)), h("td", {}, fmt.num(r.kl ?? r.kl_to_ref)), graded(r))));
  };
  const throttled = (fn, ms) => {
    let last = 0, pending = null;
    return () => {
      const wait = last + ms - Date.now();
      if (wait <= 0) { last = Date.now(); fn().catch(() => {}); }
      else if (!pending) pending = setTimeout(() => { pending = null; last = Date.now(); fn().catch(() => {}); }, wait);
    };
  };
  const soonJob = throttled(() => refreshJob(), 1000);
  const soonCkpts = throttled(loadCheckpoints, 2000);
  const soonRollouts = throttled(loadRollouts, 3000);

  let following = false;
  async function follow() {
    if (following) return;
    following = true;
    live.textContent = "live";
    live.className = "live";
    let buffer = [];
    const flush = setInterval(() => { if (buffer.length) { curves.add(buffer); buffer = []; } }, 250);
    const phaseTimer = setInterval(soonJob, 3000); // the phase's time so far, also while no event arrives
    try {
      await stream(`/v1/fine_tuning/jobs/${id}/events`, {
        params: { stream: "true", metrics: "true" }, signal: ctl.signal,
        onEvent: ({ event, data }) => {
          const item = JSON.parse(data);
          if (event === "metric") {
            buffer.push(item);
            if (item.step === 3) soonRollouts();
          } else if (event === "job") {
            showJob(item);
          } else if (event === "error") {
            eventsList.prepend(h("li", { class: "error" }, item.error?.message || "the event stream failed"));
          } else if (item.type === "metrics") {
            soonJob(); // OpenAI's per-step metrics event: its numbers are the curves' (event: metric)
          } else {
            eventsList.prepend(h("li", { class: item.level }, h("time", {}, fmt.time(item.created_at)), " ", item.message));
            soonJob();
            if (item.data?.event_type === "checkpoint_saved" || item.data?.event_type === "step_succeeded") soonCkpts();
          }
        },
      });
      live.textContent = "stream ended (job finished or paused)";
    } catch (e) {
      if (e.name !== "AbortError") live.textContent = `stream lost: ${e.message}`;
    } finally {
      clearInterval(flush);
      clearInterval(phaseTimer);
      if (buffer.length) curves.add(buffer);
      live.className = "hint";
      following = false;
    }
    if (!ctl.signal.aborted) { await refreshJob(); await loadCheckpoints(); await loadRollouts(); }
  }
  window.__curves = curves; // read by the browser tests

  refreshJob().then(() => { loadCheckpoints().catch(() => {}); loadRollouts().catch(() => {}); follow(); });
  return () => ctl.abort();
}

// ------------------------------------------------------------------------------------------- submit

async function newJobPage() {
  const [models, files] = await Promise.all([api("/v1/models"), api("/v1/files", { params: { limit: 100 } }).catch(() => ({ data: [] }))]);
  const ids = models.data.map((m) => m.id);
  const options = (list, none) => [none ? h("option", { value: "" }, none) : null, ...list.map((v) => h("option", { value: v }, v))];
  const field = (label, input, hint) => h("label", {}, h("span", {}, label), input, hint ? h("small", { class: "hint" }, hint) : null);

  const model = h("select", { name: "model", id: "model" }, options(ids));
  const method = h("select", { name: "method", id: "method" }, [["supervised", "supervised (step 1)"],
    ["reinforcement", "reinforcement (RLHF: steps 1 → 2 → 3)"], ["dpo", "dpo (step 1, then DPO)"]].map(([v, t]) => h("option", { value: v }, t)));
  const reward = h("select", { name: "reward_model", id: "reward-model" }, options(ids.filter((m) => !m.startsWith("ft:")), "(none)"));
  const fileChoices = files.data.filter((f) => f.purpose === "fine-tune").map((f) => f.id);
  const training = h("select", { name: "training_file", id: "training-file" }, options(fileChoices, "(bundled demo data)"));
  const upload = h("input", { type: "file", id: "upload", accept: ".jsonl,.json,.csv,.parquet,.txt" });
  const uploadNote = h("small", { class: "hint" });
  const preset = h("select", { name: "preset", id: "preset" }, options(["tiny", "smollm2"], "(server default)"));
  const epochs = h("input", { name: "n_epochs", id: "n-epochs", placeholder: "auto", size: 6 });
  const batch = h("input", { name: "batch_size", id: "batch-size", placeholder: "auto", size: 6 });
  const lr = h("input", { name: "learning_rate_multiplier", id: "lr-mult", placeholder: "auto", size: 6 });
  const nodes = h("input", { name: "nodes", id: "nodes", placeholder: "1", size: 4 });
  const perNode = h("input", { name: "gpus_per_node", id: "gpus-per-node", placeholder: "1", size: 4 });
  const suffix = h("input", { name: "suffix", id: "suffix", placeholder: "optional", maxlength: 64 });
  const config = h("textarea", { name: "config", id: "config", rows: 3, placeholder: '{"sft": {"max_steps": 200}}' });
  const estimate = h("div", { id: "estimate", class: "card" }, "…");
  const submit = h("button", { type: "submit", id: "submit", disabled: true }, "Submit job");
  const result = h("div");

  const num = (input, int) => {
    const v = input.value.trim();
    if (!v || v === "auto") return undefined;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(`${input.name}: "${v}" is not a number (leave it empty for auto)`);
    return int ? Math.round(n) : n;
  };
  const body = () => {
    const hp = Object.fromEntries(Object.entries({ n_epochs: num(epochs, true), batch_size: num(batch, true),
      learning_rate_multiplier: num(lr, false) }).filter(([, v]) => v !== undefined));
    const b = { model: model.value, method: { type: method.value, [method.value]: Object.keys(hp).length ? { hyperparameters: hp } : {} } };
    if (method.value === "reinforcement" && reward.value) b.reward_model = reward.value;
    if (training.value) b.training_file = training.value;
    if (preset.value) b.preset = preset.value;
    if (suffix.value.trim()) b.suffix = suffix.value.trim();
    const n = num(nodes, true), g = num(perNode, true);
    if (n !== undefined) b.nodes = n;
    if (g !== undefined) b.gpus_per_node = g;
    if (config.value.trim()) {
      try {
        b.config = JSON.parse(config.value);
      } catch {
        throw new Error("config: not valid JSON; e.g. {\"sft\": {\"max_steps\": 200}}");
      }
    }
    return b;
  };
  let seq = 0;
  const reestimate = async () => {
    const mine = ++seq;
    submit.disabled = true;
    reward.closest("label").hidden = method.value !== "reinforcement";
    try {
      const e = await api("/v1/fine_tuning/jobs/estimate", { method: "POST", body: body() });
      if (mine !== seq) return;
      estimate.replaceChildren(h("strong", {}, `Estimate: ${fmt.usd(e.usd)}, about ${fmt.secs(e.seconds)}`),
        ` on ${gpus(e.num_gpus, e.nodes)} ${e.gpu_type} at ${fmt.usd(e.price_per_gpu_hour)}/GPU-hour`,
        h("ul", {}, e.steps.map((s) => h("li", {}, `${STEP_NAMES[s.step] || `Step ${s.step}`}: ${s.tokens.toLocaleString()} tokens, ${fmt.secs(s.seconds)}, ${fmt.usd(s.usd)}`))));
      estimate.dataset.usd = e.usd;
      submit.disabled = false;
    } catch (e) {
      if (mine !== seq) return;
      delete estimate.dataset.usd;
      estimate.replaceChildren(errorBox(e));
    }
  };
  let debounce;
  const changed = () => { clearTimeout(debounce); debounce = setTimeout(reestimate, 300); };
  upload.addEventListener("change", async () => {
    const f = upload.files[0];
    if (!f) return;
    uploadNote.textContent = `uploading ${f.name}…`;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", f);
    try {
      const obj = await api("/v1/files", { method: "POST", form });
      training.append(h("option", { value: obj.id }, `${obj.id} (${obj.filename})`));
      training.value = obj.id;
      uploadNote.textContent = `uploaded as ${obj.id} (${obj.bytes.toLocaleString()} bytes)`;
      changed();
    } catch (e) {
      uploadNote.textContent = e.message;
      uploadNote.className = "error";
    }
  });
  const form = h("form", {
    id: "new-job", class: "card", oninput: changed, onchange: changed,
    onsubmit: async (ev) => {
      ev.preventDefault();
      submit.disabled = true;
      try {
        const job = await api("/v1/fine_tuning/jobs", { method: "POST", body: body() });
        location.hash = `#/jobs/${job.id}`;
      } catch (e) {
        result.replaceChildren(errorBox(e));
        submit.disabled = false;
      }
    },
  },
  field("Model (the actor)", model), field("Method", method), field("Reward model", reward, "trained in step 2 from this base model"),
  field("Training file", training), field("…or upload one", upload, uploadNote), field("Preset", preset),
  h("fieldset", {}, h("legend", {}, "Hyperparameters"), field("Epochs", epochs), field("Batch size", batch), field("Learning-rate multiplier", lr)),
  h("fieldset", {}, h("legend", {}, "Machines"), field("Nodes", nodes, "more than 1: a Slurm or Kubernetes server"),
    field("GPUs per node", perNode)),
  field("Suffix", suffix), field("Step configuration (JSON, optional)", config, "fields of config.sft / reward / ppo / dpo"),
  estimate, submit, result);
  app.replaceChildren(frame("#/new", h("h2", {}, "New fine-tuning job"), form));
  reestimate();
  return () => clearTimeout(debounce);
}

// ------------------------------------------------------------------------------------------- chat

/** Stream one reply into `out` (a text node's parent); resolves with {text, reward, finish}. */
async function streamReply(model, messages, out, { signal, temperature, maxTokens } = {}) {
  let text = "", reward = null, finish = null;
  out.textContent = "";
  await stream("/v1/chat/completions", {
    method: "POST", signal,
    body: { model, messages, stream: true, ...(temperature !== undefined ? { temperature } : {}), ...(maxTokens ? { max_tokens: maxTokens } : {}) },
    onEvent: ({ event, data }) => {
      const chunk = JSON.parse(data);
      if (event === "error") throw new Error(chunk.error?.message || "the reply failed");
      for (const c of chunk.choices || []) {
        if (c.delta?.content) { text += c.delta.content; out.textContent = text; }
        if (c.finish_reason) finish = c.finish_reason;
        if (typeof c.reward === "number") reward = c.reward;
      }
    },
  });
  return { text, reward, finish };
}

async function chatPage() {
  const models = (await api("/v1/models")).data.filter((m) => m.ready !== false).map((m) => m.id);
  const ft = models.filter((m) => m.startsWith("ft:"));
  const model = h("select", { id: "chat-model" }, [...ft, ...models.filter((m) => !m.startsWith("ft:"))].map((m) => h("option", { value: m }, m)));
  const system = h("input", { id: "system", placeholder: "system prompt (optional)" });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: "0" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: "64" });
  const log = h("div", { id: "chat-log", class: "chat-log" });
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Ask something…" });
  const send = h("button", { type: "submit", id: "send" }, "Send");
  const stop = h("button", { type: "button", id: "stop", disabled: true }, "Stop");
  const history = [];
  let ctl = null;
  stop.addEventListener("click", () => ctl?.abort());
  const form = h("form", {
    id: "chat", class: "card",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const q = input.value.trim();
      if (!q) return;
      input.value = "";
      history.push({ role: "user", content: q });
      log.append(h("div", { class: "msg user" }, q));
      const out = h("div", { class: "msg assistant streaming" });
      const meta = h("small", { class: "hint" });
      log.append(out, meta);
      send.disabled = true; stop.disabled = false;
      ctl = new AbortController();
      const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...history];
      try {
        const r = await streamReply(model.value, messages, out, { signal: ctl.signal, temperature: Number(temperature.value), maxTokens: Number(maxTokens.value) });
        history.push({ role: "assistant", content: r.text });
        meta.textContent = `${model.value} · ${r.finish}${r.reward !== null ? ` · reward ${r.reward.toFixed(3)}` : ""}`;
      } catch (e) {
        meta.textContent = e.name === "AbortError" ? "stopped" : e.message;
        meta.className = "error";
        history.pop();
      } finally {
        out.classList.remove("streaming");
        out.dataset.done = "1";
        send.disabled = false; stop.disabled = true;
      }
    },
  }, h("div", { class: "row" }, h("label", {}, "Model ", model), h("label", {}, "Temperature ", temperature), h("label", {}, "Max tokens ", maxTokens)),
  system, log, input, h("div", { class: "row" }, send, stop,
    h("button", { type: "button", onclick: () => { history.length = 0; log.replaceChildren(); } }, "New conversation")));
  app.replaceChildren(frame("#/chat", h("h2", {}, "Chat playground"), models.length ? form : h("p", {}, "No model is ready yet.")));
  return () => ctl?.abort();
}

async function comparePage() {
  const models = new Set((await api("/v1/models")).data.map((m) => m.id));
  const jobs = (await api("/v1/fine_tuning/jobs", { params: { limit: 100 } })).data.filter((j) => j.status === "succeeded" && j.fine_tuned_model);
  const job = h("select", { id: "compare-job" }, jobs.map((j) => h("option", { value: j.id }, `${j.id} · ${j.fine_tuned_model}`)));
  const prompt = h("textarea", { id: "compare-prompt", rows: 2, placeholder: "One prompt, sent to each model of the job" });
  const cols = h("div", { id: "compare-columns", class: "columns" });
  const ctl = new AbortController();
  const variants = (j) => [["SFT (step 1)", `${j.fine_tuned_model}:sft`], ["RLHF / final", j.fine_tuned_model], ["EMA", `${j.fine_tuned_model}:ema`]]
    .filter(([, id]) => models.has(id));
  const columns = () => {
    const j = jobs.find((x) => x.id === job.value);
    cols.replaceChildren(...(j ? variants(j) : []).map(([label, id]) => h("div", { class: "column card", dataset: { model: id } },
      h("h4", {}, label), h("small", { class: "mono" }, id), h("div", { class: "msg assistant reply" }), h("div", { class: "reward hint" }))));
  };
  job.addEventListener("change", columns);
  const form = h("form", {
    id: "compare", class: "card",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const messages = [{ role: "user", content: prompt.value.trim() || "Hello" }];
      await Promise.all([...cols.querySelectorAll(".column")].map(async (col) => {
        const out = col.querySelector(".reply"), score = col.querySelector(".reward");
        col.dataset.done = "";
        score.textContent = "…";
        try {
          const r = await streamReply(col.dataset.model, messages, out, { signal: ctl.signal, temperature: 0, maxTokens: 64 });
          score.textContent = r.reward !== null ? `reward ${r.reward.toFixed(3)} (the job's reward model)` : "no reward model for this job";
          if (r.reward !== null) col.dataset.reward = r.reward;
        } catch (e) {
          score.textContent = e.message;
          score.className = "reward error";
        }
        col.dataset.done = "1";
      }));
    },
  }, h("label", {}, "Job ", job), prompt, h("button", { type: "submit", id: "compare-send" }, "Send to all"), cols);
  app.replaceChildren(frame("#/compare", h("h2", {}, "Side by side: one job's models on one prompt"),
    jobs.length ? form : h("p", {}, "No succeeded job yet: the comparison needs a finished job's models.")));
  columns();
  return () => ctl.abort();
}

// ------------------------------------------------------------------------------------------- evals

function evalsPage() {
  const body = h("tbody");
  const msg = h("div");
  app.replaceChildren(frame("#/evals", h("h2", {}, "Evals"), msg,
    h("table", { id: "evals" }, h("thead", {}, h("tr", {}, ["Eval", "Name", "Criteria", "Created"].map((t) => h("th", {}, t)))), body)));
  (async () => {
    const evals = await all("/v1/evals", { params: { order: "desc" }, max: 200 });
    msg.replaceChildren(evals.length ? "" : h("p", { class: "hint" }, "No evals yet: create one with client.evals.create (docs: Evals)."));
    body.replaceChildren(...evals.map((e) => h("tr", { dataset: { eval: e.id } },
      h("td", {}, h("a", { href: `#/evals/${e.id}` }, e.id)), h("td", {}, e.name || "–"),
      h("td", {}, e.testing_criteria.map((c) => c.name).join(", ")), h("td", {}, fmt.time(e.created_at)))));
  })().catch((e) => msg.replaceChildren(errorBox(e)));
  return () => {};
}

// An eval's runs side by side (e.g. a job's SFT, RLHF and EMA models, or a base model and its fine-tune): each
// run's pass rate overall and per criterion, then the items whose outcome differs between the runs.
function evalPage(evalId) {
  const msg = h("div");
  const runsTable = h("table", { id: "eval-runs" });
  const differ = h("table", { id: "eval-differ" });
  app.replaceChildren(frame("#/evals", h("h2", {}, "Eval ", h("span", { class: "mono" }, evalId)), msg,
    h("h3", {}, "Runs side by side"), runsTable, h("h3", {}, "Items where the runs differ"), differ));
  let timer;
  const rate = (passed, total) => (total ? `${fmt.pct(passed / total)} (${passed}/${total})` : "–");
  const load = async () => {
    const [ev, runs] = await Promise.all([api(`/v1/evals/${evalId}`), all(`/v1/evals/${evalId}/runs`, { max: 200 })]);
    const shown = runs.slice(-6);
    runsTable.replaceChildren(
      h("thead", {}, h("tr", {}, h("th", {}, ""), ...shown.map((r) => h("th", { dataset: { run: r.id } }, r.name || r.id, h("div", {}, statusBadge(r.status)))))),
      h("tbody", {},
        h("tr", { dataset: { row: "overall" } }, h("th", {}, "passed"), ...shown.map((r) => h("td", {}, rate(r.result_counts.passed, r.result_counts.total)))),
        ...ev.testing_criteria.map((c) => h("tr", { dataset: { criterion: c.name } }, h("th", {}, c.name),
          ...shown.map((r) => {
            const got = r.per_testing_criteria_results.find((p) => p.testing_criteria === c.name) || { passed: 0, failed: 0 };
            return h("td", {}, rate(got.passed, got.passed + got.failed));
          }))),
        h("tr", {}, h("th", {}, "errored"), ...shown.map((r) => h("td", {}, String(r.result_counts.errored))))));
    const done = shown.filter((r) => r.status === "completed");
    const items = await Promise.all(done.map((r) => all(`/v1/evals/${evalId}/runs/${r.id}/output_items`, { max: 2000 })));
    const byItem = new Map();
    items.forEach((list, k) => list.forEach((it) => {
      if (!byItem.has(it.datasource_item_id)) byItem.set(it.datasource_item_id, { item: it.datasource_item, runs: [] });
      byItem.get(it.datasource_item_id).runs[k] = it;
    }));
    const rows = [...byItem.entries()].sort((a, b) => a[0] - b[0])
      .filter(([, v]) => new Set(done.map((_, k) => v.runs[k]?.status)).size > 1);
    differ.replaceChildren(
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "Item"), ...done.map((r) => h("th", {}, r.name || r.id)))),
      h("tbody", {}, ...(rows.length ? rows.map(([id, v]) => h("tr", { dataset: { item: id } },
        h("td", {}, String(id)), h("td", { class: "text mono" }, JSON.stringify(v.item)),
        ...done.map((_, k) => {
          const it = v.runs[k];
          if (!it) return h("td", {}, "–");
          return h("td", { class: "text", dataset: { status: it.status } }, statusBadge(it.status),
            h("div", {}, it.sample?.output?.[0]?.content ?? ""));
        })))
        : [h("tr", {}, h("td", { colspan: 2 + done.length, class: "hint" }, done.length > 1 ? "none: the runs agree on every item" : "runs differ once two have completed"))])));
    if (runs.some((r) => r.status === "queued" || r.status === "in_progress")) timer = setTimeout(() => load().catch(() => {}), 2000);
  };
  load().catch((e) => msg.replaceChildren(errorBox(e)));
  return () => clearTimeout(timer);
}

// ------------------------------------------------------------------------------------------- routing

async function route() {
  if (!key.get()) return signIn();
  leave();
  leave = () => {};
  const [, page, id] = location.hash.replace(/^#\/?/, "").match(/^([^/]*)\/?(.*)$/) || [];
  try {
    if (page === "jobs" && id) leave = jobPage(decodeURIComponent(id));
    else if (page === "new") leave = await newJobPage();
    else if (page === "chat") leave = await chatPage();
    else if (page === "compare") leave = await comparePage();
    else if (page === "evals" && id) leave = evalPage(decodeURIComponent(id));
    else if (page === "evals") leave = evalsPage();
    else leave = jobsPage();
  } catch (e) {
    if (key.get()) app.replaceChildren(frame("", errorBox(e)));
  }
}

window.addEventListener("hashchange", route);
route();
