// Playground: one prompt, the base and up to four adapters answering side by side, each column
// streamed from /v1/chat/completions (the same OpenAI-compatible route clients use) as its tokens come.
// Per column: time to first token (request sent -> first text), and tokens/s after the first token
// ((completion tokens - 1) / (last token time - first token time), the rate a reader sees text arrive).

import {authHeaders, session} from './api.js';
import {fill, h, num} from './dom.js';

const MAX_ADAPTERS = 4;
let root = null, models = [], picked = [], running = null, retry = null;

export function mount(el) {
  root = el;
  if (!session.info.playground) {
    return fill(el, h('div', {class: 'empty-state'}, h('h2', null, 'No model is loaded here'),
      h('p', null, '`peftkit dashboard` shows the runs and the registry only. Start `peftkit serve` (same page, same key) ' +
        'to compare the base and adapters side by side.')));
  }
  fill(el, h('p', {class: 'muted'}, 'Loading the model list…'));
  loadModels();
}

export function unmount() {
  root = null;
  clearTimeout(retry);
  if (running) running.abort();
}

async function loadModels() {
  const response = await fetch('/v1/models', {headers: authHeaders()});
  if (!root) return;
  if (response.status === 503) {  // the model is still loading
    fill(root, h('p', {class: 'muted'}, 'The model is loading; the playground opens when it is ready…'));
    retry = setTimeout(loadModels, 2000);
    return;
  }
  if (response.status === 401) return window.dispatchEvent(new CustomEvent('peftkit:unauthorized'));
  const body = await response.json();
  if (!response.ok) return fill(root, h('p', {class: 'error'}, body.error ? body.error.message : response.statusText));
  models = body.data;
  picked = picked.filter(id => models.some(m => m.id === id));
  draw();
}

function draw() {
  const base = models.find(m => m.parent === null) || models[0];
  const adapters = models.filter(m => m !== base);
  const count = h('span', {class: 'muted', id: 'picked-count'});
  const boxes = adapters.map(m => h('label', {class: 'pick'},
    h('input', {type: 'checkbox', value: m.id, checked: picked.includes(m.id), onchange: event => toggle(m.id, event.target.checked)}),
    m.id, m.domain ? h('span', {class: 'muted'}, ' · ' + m.domain) : null));
  const update = () => {
    count.textContent = picked.length + ' of ' + MAX_ADAPTERS + ' adapters picked';
    for (const box of boxes) {
      const input = box.querySelector('input');
      input.disabled = !input.checked && picked.length >= MAX_ADAPTERS;
    }
  };
  const toggle = (id, on) => {
    picked = on ? [...picked, id].slice(0, MAX_ADAPTERS) : picked.filter(x => x !== id);
    update();
  };
  const filter = h('input', {type: 'search', class: 'filter', placeholder: 'filter adapters', oninput: () => {
    for (const box of boxes) box.hidden = !box.textContent.toLowerCase().includes(filter.value.toLowerCase());
  }});
  const prompt = h('textarea', {id: 'prompt', rows: 3, placeholder: 'Ask something…'});
  const system = h('input', {type: 'text', id: 'system', placeholder: 'system prompt (optional)'});
  const maxTokens = h('input', {type: 'number', id: 'max-tokens', min: 1, max: 4096, value: 128});
  const temperature = h('input', {type: 'number', id: 'temperature', min: 0, max: 2, step: 0.1, value: 0});
  const columns = h('div', {class: 'columns answers', id: 'answers'});
  const send = h('button', {type: 'submit', id: 'send', class: 'primary'}, 'Send');
  const stop = h('button', {type: 'button', id: 'stop', disabled: true, onclick: () => running && running.abort()}, 'Stop');
  const form = h('form', {class: 'prompt-form', onsubmit: event => {
    event.preventDefault();
    if (!prompt.value.trim()) return prompt.focus();
    const messages = [...(system.value.trim() ? [{role: 'system', content: system.value}] : []), {role: 'user', content: prompt.value}];
    run([base.id, ...picked], messages, {max_tokens: Number(maxTokens.value) || 128, temperature: Number(temperature.value) || 0},
      columns, send, stop);
  }}, prompt, h('div', {class: 'row'}, system, h('label', null, 'max tokens ', maxTokens),
    h('label', null, 'temperature ', temperature), send, stop));
  fill(root, h('section', {class: 'panel picker'},
    h('h3', null, 'Models ', count), h('p', {class: 'muted small'}, 'The base (' + base.id + ') always answers; pick up to ' +
      MAX_ADAPTERS + ' adapters to answer beside it.'),
    adapters.length > 8 ? filter : null, h('div', {class: 'picks', id: 'picks'}, boxes.length ? boxes
      : h('p', {class: 'muted'}, 'The registry has no adapter this server can run.'))), form, columns);
  update();
}

async function run(ids, messages, options, columns, send, stop) {
  if (running) running.abort();
  const controller = running = new AbortController();
  const cols = ids.map(id => column(id));
  fill(columns, cols.map(c => c.el));
  columns.style.setProperty('--n', String(ids.length));
  send.disabled = true;
  stop.disabled = false;
  await Promise.all(cols.map(c => stream(c, messages, options, controller.signal)));
  if (running === controller) running = null;
  send.disabled = false;
  stop.disabled = true;
}

function column(model) {
  const answer = h('div', {class: 'answer'});
  const stats = h('div', {class: 'stats small'}, 'waiting…');
  const el = h('article', {class: 'answer-col', 'data-model': model, 'data-state': 'waiting'},
    h('header', null, h('strong', null, model)), stats, answer);
  return {model, el, answer, stats};
}

async function stream(col, messages, options, signal) {
  const sent = performance.now();
  let first = null, last = null, pieces = 0, usage = null, finish = null;
  const show = state => {
    col.el.dataset.state = state;
    const tokens = usage ? usage.completion_tokens : pieces;
    const ttft = first === null ? null : (first - sent) / 1000;
    const rate = tokens > 1 && last > first ? (tokens - 1) / ((last - first) / 1000) : null;
    if (ttft !== null) col.el.dataset.ttft = ttft.toFixed(3);
    if (rate !== null) col.el.dataset.tps = rate.toFixed(1);
    fill(col.stats, h('span', {class: 'ttft'}, 'TTFT ' + (ttft === null ? '…' : num(ttft, 3) + ' s')), ' · ',
      h('span', {class: 'tps'}, (rate === null ? '…' : num(rate, 3)) + ' tok/s'), ' · ', tokens + ' tokens',
      finish ? ' · ' + finish : state === 'streaming' ? ' · streaming' : '');
  };
  try {
    const response = await fetch('/v1/chat/completions', {method: 'POST', signal,
      headers: authHeaders({'Content-Type': 'application/json'}),
      body: JSON.stringify({model: col.model, messages, ...options, stream: true, stream_options: {include_usage: true}})});
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {  // one server-sent event per blank-line-ended block
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split('\n')) {
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const text = choice.delta && choice.delta.content;
            if (text) {
              last = performance.now();
              if (first === null) first = last;
              pieces += 1;
              col.answer.append(text);
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      show('streaming');
    }
    show('done');
  } catch (error) {
    if (error.name === 'AbortError') return show('stopped');
    col.answer.append(h('p', {class: 'error'}, error.message));
    show('error');
  }
}
