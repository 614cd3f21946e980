// Live curves: one small uPlot chart per metric of a step, x = the step's global step.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

// what a person watching RLHF looks at first; any other numeric metric follows, grader parts included
const FIRST = ["reward_mean", "valid_reward_mean", "kl_to_ref", "actor_loss", "critic_loss", "loss", "valid_loss",
  "full_valid_loss", "mean_token_accuracy", "valid_mean_token_accuracy", "lr", "tokens_per_s", "samples_per_s",
  "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "accuracy", "reward_std", "kl_loss",
  "unsup_loss"];
const SKIP = new Set(["epoch", "time", "final", "step"]);

// axis labels with as many decimals as the grid's spacing needs (lr moves in the 5th decimal, tokens/s in thousands)
function ticks(u, splits) {
  const gap = splits.length > 1 ? Math.abs(splits[1] - splits[0]) : Math.abs(splits[0] || 1);
  const digits = gap > 0 ? Math.max(0, Math.ceil(-Math.log10(gap))) : 0;
  return splits.map((v) => (digits > 6 ? v.toExponential(1) : Math.abs(v) >= 1e5 ? `${+(v / 1000).toPrecision(3)}k` : v.toFixed(digits)));
}
const MAX_CHARTS = 16;

export { order };

export const STEP_NAMES = { 1: "Step 1 · SFT", 2: "Step 2 · reward model / DPO", 3: "Step 3 · RL" };

function order(keys) {
  const rank = (k) => (FIRST.includes(k) ? FIRST.indexOf(k) : k.startsWith("grader_") ? 100 : 200);
  return [...keys].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b)).slice(0, MAX_CHARTS);
}

/** The curves of one job: `add(points)` takes metric points ({step, global_step, values}) as they come. */
export class Curves {
  constructor(root) {
    this.root = root;
    this.steps = new Map(); // step → {xs, series: Map(key → values[]), charts: Map(key → {plot, box}), box}
  }

  add(points) {
    const touched = new Set();
    for (const p of points) {
      const s = this.step(p.step);
      if (s.xs.length && p.global_step <= s.xs[s.xs.length - 1]) continue; // already drawn
      const n = s.xs.length;
      s.xs.push(p.global_step);
      for (const [k, v] of Object.entries(p.values || {})) {
        if (typeof v !== "number" || !Number.isFinite(v) || SKIP.has(k)) continue;
        if (!s.series.has(k)) s.series.set(k, new Array(n).fill(null));
        s.series.get(k).push(v);
      }
      for (const vals of s.series.values()) if (vals.length < s.xs.length) vals.push(null);
      touched.add(p.step);
    }
    for (const step of touched) this.draw(step);
  }

  step(step) {
    if (!this.steps.has(step)) {
      const box = document.createElement("section");
      box.className = "curves-step";
      box.dataset.step = step;
      const h = document.createElement("h3");
      h.textContent = STEP_NAMES[step] || `Step ${step}`;
      const grid = document.createElement("div");
      grid.className = "chart-grid";
      box.append(h, grid);
      const after = [...this.root.children].find((c) => Number(c.dataset.step) > step);
      this.root.insertBefore(box, after || null);
      this.steps.set(step, { xs: [], series: new Map(), charts: new Map(), box, grid });
    }
    return this.steps.get(step);
  }

  draw(step) {
    const s = this.steps.get(step);
    for (const k of order(s.series.keys())) {
      const data = [s.xs, s.series.get(k)];
      let c = s.charts.get(k);
      if (!c) {
        const box = document.createElement("div");
        box.className = "chart";
        box.dataset.metric = k;
        s.grid.append(box);
        const plot = new uPlot({
          title: k, width: 300, height: 170, legend: { show: false }, cursor: { show: true },
          scales: { x: { time: false } }, series: [{}, { stroke: "#3366cc", width: 1.5, spanGaps: true }],
          axes: [{ size: 30 }, { size: 54, values: ticks }],
        }, data, box);
        c = { plot, box };
        s.charts.set(k, c);
      } else {
        c.plot.setData(data);
      }
      const last = [...data[1]].reverse().find((v) => v !== null);
      c.box.dataset.points = data[1].filter((v) => v !== null).length;
      c.box.title = `${k}: ${c.box.dataset.points} points, last ${last}`;
    }
  }

  /** Points drawn for `metric` in `step` (what the browser tests read). */
  points(step, metric) {
    return this.steps.get(step)?.series.get(metric)?.filter((v) => v !== null).length || 0;
  }
}
