// The playground: sends one chat completion request to POST /v1/playground/runs and draws the
// trace of its run (server-sent events named by kind: route, stage, step, commit, draft, verdict,
// repair, rounds, final, error; see pipeline/watch.py) as it arrives.
"use strict";

const $ = (id) => document.getElementById(id);

const EXAMPLES = {
  json: {
    prompt: "Extract: Ana Lopez is 34 years old and lives in Lima.",
    constraint: "json_schema",
    spec: JSON.stringify({type: "object", properties: {name: {type: "string"}, age: {type: "integer"}},
                          required: ["name", "age"]}),
    maxTokens: 64,
  },
  sudoku: {  // a held-out medium puzzle (models/sudoku.py: puzzle("eval", 7, 0, "medium"))
    puzzle: "003004051409000000060000000006091305185030070002870140030082600000900510014000007",
    constraint: "sudoku",
    maxTokens: 82,
  },
};

// one run's state: every step received, the frame shown, whether the view follows the newest step
const run = { steps: [], shown: -1, playing: true, timer: null, spec: null, constraint: null, t: 0, stages: [] };

function escapeHtml(s) {
  return s.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
}

function headers() {
  const h = {"content-type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["authorization"] = "Bearer " + key;
  return h;
}

async function loadModels() {
  const select = $("model");
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const body = await r.json();
    select.innerHTML = "";
    for (const m of body.data || []) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      select.appendChild(o);
    }
    if (!r.ok) $("status").textContent = body.error ? body.error.message : "could not list models";
  } catch (e) {
    $("status").textContent = "could not list models: " + e;
  }
}

function useExample(name) {
  const ex = EXAMPLES[name];
  $("constraint").value = ex.constraint;
  $("max-tokens").value = ex.maxTokens;
  if (name === "sudoku") {
    $("spec").value = ex.puzzle;
    $("prompt").value = "Solve this sudoku (0 is a blank, rows left to right, top to bottom): " + ex.puzzle;
    const sudokuModel = [...$("model").options].find((o) => o.value.includes("sudoku"));
    if (sudokuModel) $("model").value = sudokuModel.value;
    $("route").value = "diffusion";
  } else {
    $("spec").value = ex.spec;
    $("prompt").value = ex.prompt;
    $("model").selectedIndex = 0;
  }
}

function requestBody() {
  const body = {
    model: $("model").value,
    messages: [{role: "user", content: $("prompt").value}],
    route: $("route").value,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const kind = $("constraint").value;
  const spec = $("spec").value.trim();
  if (kind === "json_schema") {
    body.response_format = {type: "json_schema", json_schema: {name: "playground", schema: JSON.parse(spec)}};
  } else if (kind === "json_object") {
    body.response_format = {type: "json_object"};
  } else if (kind === "regex") {
    body.response_format = {type: "regex", regex: {pattern: spec}};
  } else if (kind === "sudoku") {
    body.response_format = {type: "sudoku", sudoku: {puzzle: spec}};
  }
  return body;
}

function reset() {
  clearInterval(run.timer);
  Object.assign(run, { steps: [], shown: -1, playing: true, timer: null, spec: null, constraint: null, t: 0, stages: [] });
  for (const id of ["route-info", "timeline", "canvas", "board", "commits", "verdicts", "final-answer", "final-meta", "step-label"]) {
    $(id).innerHTML = "";
  }
  $("rounds").querySelector("tbody").innerHTML = "";
  $("rounds-section").hidden = true;
  $("board").hidden = true;
  $("step-count").textContent = "0";
  $("scrub").max = 0;
  $("scrub").value = 0;
  $("play").textContent = "Pause";
  document.body.dataset.state = "running";
}

// -- the canvas ------------------------------------------------------------------------------
function entropyColour(h) {
  // 0 nats: green; 2 nats and above: red
  const x = Math.min(1, h / 2);
  return `hsl(${Math.round(140 * (1 - x))}, 70%, ${Math.round(80 + 2 * x)}%)`;
}

function drawStep(i) {
  const s = run.steps[i];
  if (!s) return;
  run.shown = i;
  $("scrub").value = i;
  $("step-label").textContent = `canvas ${s.canvas} · step ${s.step + 1} · ${s.accepted.filter(Boolean).length}/${s.tokens.length} accepted`;
  const canvas = $("canvas");
  if (canvas.children.length !== s.tokens.length) {
    canvas.innerHTML = "";
    for (let p = 0; p < s.tokens.length; p++) {
      const c = document.createElement("div");
      c.className = "cell";
      canvas.appendChild(c);
    }
  }
  s.tokens.forEach((tok, p) => {
    const c = canvas.children[p];
    c.textContent = tok;
    c.title = `position ${p}: ${JSON.stringify(tok)}, entropy ${s.entropy[p]} nats${s.accepted[p] ? ", accepted" : ""}`;
    c.style.background = entropyColour(s.entropy[p]);
    c.classList.toggle("accepted", s.accepted[p]);
  });
  if (run.constraint === "sudoku") drawBoard(s);
}

function drawBoard(s) {
  const board = $("board");
  board.hidden = false;
  if (board.children.length !== 81) {
    board.innerHTML = "";
    for (let i = 0; i < 81; i++) {
      const q = document.createElement("div");
      q.className = "sq" + (i % 9 === 2 || i % 9 === 5 ? " box-right" : "") +
        (Math.floor(i / 9) === 2 || Math.floor(i / 9) === 5 ? " box-bottom" : "");
      board.appendChild(q);
    }
  }
  const puzzle = typeof run.spec === "string" ? run.spec : "";
  for (let i = 0; i < 81; i++) {
    const q = board.children[i];
    const clue = puzzle[i] && puzzle[i] !== "0" && puzzle[i] !== ".";
    q.textContent = clue ? puzzle[i] : (s.tokens[i] || "").trim();
    q.classList.toggle("clue", !!clue);
    q.classList.toggle("accepted", !clue && !!s.accepted[i]);
    q.style.background = clue ? "" : entropyColour(s.entropy[i] ?? 0);
  }
}

function addStep(step) {
  run.steps.push(step);
  const n = run.steps.length;
  $("step-count").textContent = String(n);
  $("scrub").max = n - 1;
  if (run.playing && run.timer === null) drawStep(n - 1);
}

function setPlaying(playing) {
  run.playing = playing;
  $("play").textContent = playing ? "Pause" : "Play";
  clearInterval(run.timer);
  run.timer = null;
  if (!playing) return;
  if (run.shown >= run.steps.length - 1) {
    run.shown = -1;  // replay from the first step
  }
  run.timer = setInterval(() => {
    if (run.shown < run.steps.length - 1) {
      drawStep(run.shown + 1);
    } else {
      clearInterval(run.timer);
      run.timer = null;  // caught up: new steps are drawn as they arrive
    }
  }, 120);
}

// -- stages, verdicts, answer ----------------------------------------------------------------
function drawTimeline() {
  const end = Math.max(run.t, ...run.stages.map((s) => s.end), 0.001);
  const tl = $("timeline");
  tl.innerHTML = "";
  for (const s of run.stages) {
    const row = document.createElement("div");
    row.className = "stage";
    row.innerHTML = `<span class="name"></span><span class="track"><span class="bar"></span></span><span class="secs"></span>`;
    row.querySelector(".name").textContent = s.name;
    const bar = row.querySelector(".bar");
    bar.style.left = `${(100 * s.start) / end}%`;
    bar.style.width = `${(100 * (s.end - s.start)) / end}%`;
    bar.classList.toggle("failed", !s.ok);
    row.querySelector(".secs").textContent = `${((s.end - s.start) * 1000).toFixed(0)} ms`;
    tl.appendChild(row);
  }
}

// ``text`` with the characters in ``spans`` ([start, end) pairs) wrapped in <mark class="error-span">
function highlighted(text, spans) {
  const marked = new Array(text.length).fill(false);
  for (const [a, b] of spans) for (let i = Math.max(0, a); i < Math.min(text.length, b); i++) marked[i] = true;
  let html = "", open = false;
  for (let i = 0; i < text.length; i++) {
    if (marked[i] !== open) {
      html += marked[i] ? '<mark class="error-span">' : "</mark>";
      open = marked[i];
    }
    html += escapeHtml(text[i]);
  }
  if (open) html += "</mark>";
  // an error at the very end of the text (it stops short): a marked gap where the text should go on
  if (spans.some(([a]) => a >= text.length)) html += '<mark class="error-span"> </mark>';
  return html;
}

function addVerdict(v) {
  const div = document.createElement("div");
  div.className = "verdict" + (v.ok ? "" : " invalid");
  div.dataset.of = v.of;
  const errors = v.errors.map((e) => `<li>${escapeHtml(e)}</li>`).join("");
  div.innerHTML = `<div><b>${escapeHtml(v.of)}</b> <span class="badge ${v.ok ? "ok" : "bad"}">${v.ok ? "valid" : "invalid"}</span></div>
    <pre>${highlighted(v.text, v.spans)}</pre>${errors ? `<ul class="errors">${errors}</ul>` : ""}`;
  $("verdicts").appendChild(div);
}

function addRepair(r) {
  const div = document.createElement("div");
  div.className = "repair";
  div.innerHTML = `<div><b>repair</b>: kept ${r.kept_tokens ?? 0} of ${r.draft_tokens ?? "?"} draft tokens; AR wrote the rest</div>
    <pre><span class="kept"></span><span class="added"></span></pre>`;
  div.querySelector(".kept").textContent = r.kept;
  div.querySelector(".added").textContent = r.added;
  $("verdicts").appendChild(div);
}

function addRounds(r) {
  $("rounds-section").hidden = false;
  const body = $("rounds").querySelector("tbody");
  r.accepted.forEach((n, i) => {
    const tr = document.createElement("tr");
    for (const cell of [String(i + 1), String(n), JSON.stringify(r.texts[i] ?? ""), JSON.stringify(r.corrections[i] ?? "")]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  });
}

function showFinal(body) {
  const choice = body.choices[0];
  $("final-answer").textContent = choice.message.content;
  // a structured answer is a success only once the validator accepted it
  const badge = run.constraint ? `<span class="badge ok">validated</span> ` : "";
  $("final-meta").innerHTML = `${badge}route <b>${escapeHtml(body.route.path)}</b> (${escapeHtml(body.route.reason)}) ·
    ${body.usage.prompt_tokens} prompt + ${body.usage.completion_tokens} completion tokens · finish ${escapeHtml(choice.finish_reason)}`;
  document.body.dataset.state = "done";
}

function showError(body) {
  $("final-answer").textContent = "";
  const e = body.error || {};
  $("final-meta").innerHTML = `<span class="badge bad">HTTP ${body.status ?? "?"}</span> ${escapeHtml(e.message || "error")}`;
  document.body.dataset.state = "error";
}

function handle(kind, data) {
  run.t = Math.max(run.t, data.t || 0);
  switch (kind) {
    case "route":
      run.constraint = data.constraint;
      run.spec = data.spec;
      $("route-info").innerHTML = `Route: <span class="path">${escapeHtml(data.path)}</span> — ${escapeHtml(data.reason)}
        <small>(model ${escapeHtml(data.model)}, request ${escapeHtml(data.request_id)})</small>`;
      break;
    case "step": addStep(data); break;
    case "commit": {
      const p = document.createElement("div");
      p.textContent = `canvas committed at ${data.t.toFixed(3)} s: ${JSON.stringify(data.text)}`;
      $("commits").appendChild(p);
      break;
    }
    case "stage": run.stages.push(data); drawTimeline(); break;
    case "verdict": addVerdict(data); break;
    case "repair": addRepair(data); break;
    case "rounds": addRounds(data); break;
    case "final": drawTimeline(); showFinal(data); break;
    case "error": drawTimeline(); showError(data); break;
  }
}

async function start() {
  reset();
  let body;
  try {
    body = requestBody();
  } catch (e) {
    $("status").textContent = "the schema is not JSON: " + e.message;
    document.body.dataset.state = "error";
    return;
  }
  $("run").disabled = true;
  $("status").textContent = "running…";
  try {
    const r = await fetch("/v1/playground/runs", {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!r.ok || !r.body) {
      showError({status: r.status, ...(await r.json())});
      return;
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message", data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) handle(kind, JSON.parse(data));
      }
    }
  } catch (e) {
    showError({status: "?", error: {message: String(e)}});
  } finally {
    $("run").disabled = false;
    $("status").textContent = "";
    if (document.body.dataset.state === "running") document.body.dataset.state = "done";
  }
}

$("run").addEventListener("click", start);
$("play").addEventListener("click", () => setPlaying(!run.playing));
$("scrub").addEventListener("input", (e) => { setPlaying(false); drawStep(Number(e.target.value)); });
$("example-json").addEventListener("click", () => useExample("json"));
$("example-sudoku").addEventListener("click", () => useExample("sudoku"));
$("api-key").addEventListener("change", loadModels);
loadModels();
