// Runs: every training run under the server's runs folder, and one run whole. A run still training is
// polled every couple of seconds, so its curves grow on the page as the Trainer logs.

import {api, enc} from './api.js';
import {lineChart} from './chart.js';
import {ago, badge, fill, fingerprint, h, kvTable, num, rowsTable} from './dom.js';

const LIST_EVERY_MS = 5000, RUNNING_EVERY_MS = 2000;
let root = null, listEl = null, detailEl = null, selected = '', listTimer = null, runTimer = null;

export function mount(el, arg) {
  root = el;
  listEl = h('aside', {class: 'run-list', id: 'run-list'}, h('p', {class: 'muted'}, 'Loading runs…'));
  detailEl = h('div', {class: 'run-detail', id: 'run-detail'});
  fill(el, h('div', {class: 'split'}, listEl, detailEl));
  selected = arg;
  refreshList();
  listTimer = setInterval(refreshList, LIST_EVERY_MS);
}

export function unmount() {
  clearInterval(listTimer);
  clearTimeout(runTimer);
  root = null;
}

export function select(arg) {
  selected = arg;
  refreshList();
}

async function refreshList() {
  let data;
  try {
    data = await api('/dashboard/api/runs');
  } catch (error) {
    return fill(listEl, h('p', {class: 'error'}, error.message));
  }
  if (!root) return;
  const runs = data.runs;
  if (!runs.length) {
    fill(listEl, h('p', {class: 'muted'}, 'No training runs in ' + data.root + ' yet.'));
    return fill(detailEl, h('div', {class: 'empty-state'}, h('h2', null, 'No runs yet'),
      h('p', null, 'Runs appear here as `peftkit train` writes them (each run folder holds run.json).'),
      h('p', {class: 'muted'}, 'Folder: ' + data.root)));
  }
  if (!runs.some(r => r.id === selected)) selected = runs[0].id;
  fill(listEl, h('h2', null, 'Runs ', h('span', {class: 'count'}, String(runs.length))),
    runs.map(r => h('a', {class: ['run-item', r.id === selected && 'active'], href: '#runs/' + enc(r.id), 'data-run': r.id},
      h('div', {class: 'run-name'}, r.name, ' ', statusBadge(r)),
      h('div', {class: 'muted small'}, r.id),
      h('div', {class: 'small'}, 'step ' + num(r.step) + (r.max_steps ? ' / ' + num(r.max_steps) : ''),
        r.train_loss !== null ? ' · loss ' + num(r.train_loss) : '', r.eval_loss !== null ? ' · eval ' + num(r.eval_loss) : ''),
      h('div', {class: 'muted small'}, [r.method, r.model].filter(Boolean).join(' · ') + ' · ' + ago(r.updated_age_s)))));
  if (detailEl.dataset.run !== selected) showRun(selected);
}

function statusBadge(run) {
  if (run.stale) return badge('running? no update ' + ago(run.updated_age_s), 'warn');
  return badge(run.status, {running: 'live', finished: 'ok', interrupted: 'warn'}[run.status] || 'muted');
}

async function showRun(id) {
  detailEl.dataset.run = id;
  clearTimeout(runTimer);
  const parts = {head: h('header', {class: 'run-head'}), charts: h('div', {class: 'charts'}), body: h('div')};
  fill(detailEl, parts.head, parts.charts, parts.body);
  let lastStatus = null, bodyDrawn = false;
  const poll = async () => {
    if (!root || detailEl.dataset.run !== id) return;
    let run;
    try {
      run = await api('/dashboard/api/runs/' + id.split('/').map(enc).join('/'));
    } catch (error) {
      return fill(parts.head, h('p', {class: 'error'}, error.message));
    }
    if (!root || detailEl.dataset.run !== id) return;
    drawHead(parts.head, run);
    drawCharts(parts.charts, run);
    if (!bodyDrawn || run.status !== lastStatus) drawBody(parts.body, run);  // metrics, data, eval land at the end
    bodyDrawn = true;
    lastStatus = run.status;
    if (run.status === 'running') {
      runTimer = setTimeout(poll, RUNNING_EVERY_MS);
      refreshList();  // its entry in the list moves on with it
    }
  };
  await poll();
}

function drawHead(el, run) {
  fill(el, h('h2', null, run.name, ' ', statusBadge(run)),
    h('p', {class: 'muted'}, run.path),
    h('div', {class: 'facts'},
      fact('step', num(run.step) + (run.max_steps ? ' / ' + num(run.max_steps) : ''), 'run-step'),
      fact('train loss', num(run.train_loss), 'run-train-loss'),
      fact('eval loss', num(run.eval_loss), 'run-eval-loss'),
      fact('method', run.method || '—'), fact('model', run.model || '—'),
      fact('updated', ago(run.updated_age_s))),
    run.status === 'running' ? h('p', {class: 'live-note'}, h('span', {class: 'pulse'}), 'live: updates every ' +
      RUNNING_EVERY_MS / 1000 + ' s') : null);
}

function fact(label, value, id) {
  return h('div', {class: 'fact'}, h('span', {class: 'label'}, label), h('span', {class: 'value', id}, value));
}

function drawCharts(el, run) {
  const c = run.curves || {};
  const note = {tensorboard: 'from the run\'s TensorBoard events', checkpoint: 'from the newest checkpoint\'s trainer state',
    none: 'no curves: the run has no TensorBoard events or checkpoints yet'}[run.curves_source];
  fill(el,
    lineChart([{label: 'train', points: c['train/loss'], cls: 's1'}, {label: 'eval', points: c['eval/loss'], cls: 's2'}],
      {title: 'Loss', empty: note}),
    lineChart([{label: 'learning rate', points: c['train/learning_rate'], cls: 's3'}], {title: 'Learning rate', empty: note, width: 340}),
    run.curves_source === 'none' ? null : h('p', {class: 'muted small'}, 'Curves ' + note + '.'));
}

function drawBody(el, run) {
  const metrics = {...run.metrics};
  const probe = metrics.dtype_probe;
  delete metrics.dtype_probe;
  fill(el,
    section('Metrics', run.status === 'running' && !Object.keys(metrics).length
      ? h('p', {class: 'muted'}, 'metrics.json is written when the run finishes.') : kvTable(metrics),
      probe ? h('details', null, h('summary', null, 'dtype probe'), kvTable(probe)) : null),
    section('Data', run.data ? dataStats(run.data) : h('p', {class: 'muted'}, 'Data statistics are written with metrics.json when the run finishes.')),
    section('Evaluation', run.evaluation ? evaluation(run.evaluation) : h('p', {class: 'muted'},
      'No evaluation in this run (eval.generate with an eval split writes one; `peftkit eval` stores one in the registry).')),
    section('Lineage', kvTable({'base fingerprint': run.base_fingerprint, 'data fingerprint': run.data_fingerprint,
      'adapter saved': run.has_adapter})),
    section('Resolved config', configTable(run.config),
      run.config_yaml ? h('details', null, h('summary', null, 'config.yaml'), h('pre', {class: 'code'}, run.config_yaml)) : null));
}

function section(title, ...children) {
  return h('section', {class: 'panel', 'data-section': title}, h('h3', null, title), children);
}

function dataStats(data) {
  const {sources, skipped, eval: evalStats, ...rest} = data;
  return [kvTable(rest), sources && sources.length ? [h('h4', null, 'Sources'), rowsTable(sources)] : null,
    evalStats ? [h('h4', null, 'Eval split'), kvTable(evalStats)] : null,
    skipped ? h('details', null, h('summary', null, 'skipped rows'), kvTable(skipped)) : null];
}

export function evaluation(report) {
  const scores = report.scores || {};
  const metrics = [...new Set(Object.values(scores).flatMap(s => Object.keys(s || {})))];
  const table = h('table', {class: 'grid'},
    h('thead', null, h('tr', null, h('th', null, 'metric'), h('th', null, 'base'), h('th', null, 'adapter'), h('th', null, 'change'))),
    h('tbody', null, metrics.map(m => h('tr', null, h('td', null, m), h('td', null, num((scores.base || {})[m])),
      h('td', null, num((scores.adapter || {})[m])), h('td', null, num((report.difference || {})[m]))))));
  return [h('p', {class: 'muted'}, num(report.cases) + ' examples of ' + (report.data || 'the eval split') +
      (report.seconds ? ' · ' + num(report.seconds, 3) + ' s' : '')), table,
    report.forgetting ? [h('h4', null, 'Forgetting (general text)'), kvTable(report.forgetting)] : null,
    report.examples && report.examples.length ? [h('h4', null, 'Examples'), rowsTable(report.examples)] : null];
}

function configTable(config) {
  const keys = Object.keys(config || {});
  if (!keys.length) return h('p', {class: 'muted'}, 'run.json has no config');
  const body = h('tbody');
  const filter = h('input', {type: 'search', placeholder: 'filter keys', class: 'filter', oninput: () => draw(filter.value)});
  const draw = text => fill(body, keys.filter(k => k.includes(text)).map(k => h('tr', null, h('th', null, k),
    h('td', null, h('code', null, JSON.stringify(config[k]))))));
  draw('');
  return [filter, h('div', {class: 'scroll'}, h('table', {class: 'kv config'}, body))];
}
