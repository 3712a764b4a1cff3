// Registry: every adapter version by domain, with tags, lineage, size, scores and verify status;
// tag, untag and remove (after a confirmation) call the same Registry methods as `peftkit registry`.

import {api, enc} from './api.js';
import {ask} from './ask.js';
import {badge, bytes, fill, fingerprint, h, kvTable, num, rowsTable} from './dom.js';
import {evaluation} from './runs.js';

let root = null, entries = [], verified = {}, selected = '', filterText = '';
let tableEl = null, detailEl = null, statusEl = null, countEl = null;

export function mount(el, arg) {
  root = el;
  selected = arg;
  statusEl = h('span', {class: 'status', id: 'registry-status', role: 'status'});
  countEl = h('span', {class: 'muted', id: 'registry-count'});
  const filter = h('input', {type: 'search', placeholder: 'filter by name, tag, domain or method', class: 'filter',
    id: 'registry-filter', value: filterText, oninput: () => { filterText = filter.value; drawTable(); }});
  tableEl = h('div', {id: 'registry-table'}, h('p', {class: 'muted'}, 'Loading the registry…'));
  detailEl = h('div', {class: 'entry-detail', id: 'entry-detail'});
  fill(el, h('div', {class: 'toolbar'}, filter,
    h('button', {id: 'verify-all', onclick: verifyAll}, 'Verify all'), countEl, statusEl), tableEl, detailEl);
  load();
}

export function unmount() {
  root = null;
}

export function select(arg) {
  selected = arg;
  drawTable();
  showEntry(selected);
}

async function load() {
  try {
    const data = await api('/dashboard/api/registry');
    entries = data.entries;
    if (!root) return;
    countEl.textContent = entries.length + ' versions in ' + data.path;
  } catch (error) {
    return fill(tableEl, h('p', {class: 'error'}, error.message));
  }
  drawTable();
  showEntry(selected);
}

function matches(e) {
  const text = filterText.trim().toLowerCase();
  return !text || [e.ref, e.domain, e.method, ...e.tags].some(v => v && String(v).toLowerCase().includes(text));
}

function drawTable() {
  if (!root || !tableEl) return;
  if (!entries.length) return fill(tableEl, h('div', {class: 'empty-state'}, h('h2', null, 'The registry is empty'),
    h('p', null, 'Adapters appear here once training registers them, or with `peftkit registry add DIR --name NAME`.')));
  const byDomain = {};
  for (const e of entries.filter(matches)) (byDomain[e.domain || ''] ||= []).push(e);
  const domains = Object.keys(byDomain).sort((a, b) => (a === '') - (b === '') || a.localeCompare(b));
  fill(tableEl, domains.length ? domains.map(d => h('section', {class: 'domain'},
    h('h3', null, d || 'no domain', ' ', h('span', {class: 'count'}, String(byDomain[d].length))),
    h('table', {class: 'grid registry'},
      h('thead', null, h('tr', null, ['adapter', 'tags', 'method', 'size', 'base', 'data', 'parent', 'scores', 'verify', '']
        .map(c => h('th', null, c)))),
      h('tbody', null, byDomain[d].map(row))))) : h('p', {class: 'muted'}, 'Nothing matches the filter.'));
}

function row(e) {
  const check = verified[e.ref];
  return h('tr', {'data-ref': e.ref, class: e.ref === selected && 'active'},
    h('td', null, h('a', {href: '#registry/' + enc(e.ref), class: 'ref'}, e.name, h('span', {class: 'muted'}, '@' + e.version)),
      e.latest ? badge('latest', 'muted') : null),
    h('td', {class: 'tags'}, e.tags.map(t => h('span', {class: 'tag', 'data-tag': t}, t,
      h('button', {class: 'untag', title: 'untag ' + e.name + ':' + t, 'aria-label': 'untag ' + t, onclick: () => untag(e, t)}, '×'))),
      h('button', {class: 'add-tag small', onclick: () => tag(e)}, '+ tag')),
    h('td', null, e.method || '—', e.rank ? h('span', {class: 'muted'}, ' r' + e.rank) : null),
    h('td', {class: 'num'}, bytes(e.size)),
    h('td', null, h('div', null, e.base_model || 'unknown'), fingerprint(e.base_fingerprint)),
    h('td', null, fingerprint(e.data_fingerprint)),
    h('td', null, e.parent ? (entries.some(p => p.ref === e.parent) ? h('a', {href: '#registry/' + enc(e.parent)}, e.parent) : e.parent) : '—'),
    h('td', {class: 'scores'}, scores(e.scores)),
    h('td', {class: 'verify'}, check === undefined ? h('button', {class: 'small', onclick: () => verifyOne(e)}, 'verify')
      : check.ok ? badge('ok', 'ok') : badge(check.problems.length + ' problems', 'bad')),
    h('td', null, h('button', {class: 'danger small remove', onclick: () => remove(e)}, 'remove')));
}

function scores(s) {
  const parts = [];
  if (s.eval_loss !== undefined) parts.push(h('div', null, 'eval loss ' + num(s.eval_loss)));
  else if (s.train_loss !== undefined) parts.push(h('div', null, 'train loss ' + num(s.train_loss)));
  for (const [k, [base, tuned]] of Object.entries(s.evaluation || {})) {
    parts.push(h('div', {class: 'small'}, k + ' ' + num(base, 3) + ' → ' + num(tuned, 3)));
  }
  if (s.forgetting !== undefined) parts.push(h('div', {class: 'small muted'}, 'general text ' + (s.forgetting * 100).toFixed(1) + '%'));
  return parts.length ? parts : h('span', {class: 'muted'}, '—');
}

async function showEntry(ref) {
  if (!ref) return fill(detailEl);
  let e;
  try {
    e = await api('/dashboard/api/registry/' + enc(ref));
  } catch (error) {
    return fill(detailEl, h('p', {class: 'error'}, error.message));
  }
  if (!root || ref !== selected) return;
  const children = (entries.find(x => x.ref === e.ref) || {}).children || [];
  const link = r => h('a', {href: '#registry/' + enc(r)}, r);
  fill(detailEl, h('section', {class: 'panel'},
    h('h2', null, e.ref, ' ', e.tags.map(t => badge(t, 'tag'))),
    h('div', {class: 'columns'},
      h('div', null, h('h3', null, 'Lineage'), kvTable({
        'base model': e.base_model, 'base fingerprint': e.base_fingerprint, 'data fingerprint': e.data_fingerprint,
        'domain': e.domain, 'method': e.method, 'peft type': e.peft_type, 'rank': e.rank, 'size': bytes(e.size),
        'created': e.created_at, 'registered': e.registered_at, 'source': (e.lineage || {}).source}),
      h('h4', null, 'Parents'), e.parents.length ? h('ol', {class: 'chain'}, e.parents.map(p =>
        h('li', null, p.registered ? link(p.ref) : p.ref, p.registered ? '' : h('span', {class: 'muted'}, ' (not registered here)'))))
        : h('p', {class: 'muted'}, 'none: trained from the base'),
      h('h4', null, 'Children'), children.length ? h('ul', {class: 'chain'}, children.map(c => h('li', null, link(c))))
        : h('p', {class: 'muted'}, 'none')),
      h('div', null, h('h3', null, 'Files'), rowsTable(e.files.map(f => ({path: f.path, size: bytes(f.size),
        sha256: f.sha256.slice(0, 12) + '…'}))))),
    h('h3', null, 'Evaluation'), e.metrics && e.metrics.evaluation ? evaluation(e.metrics.evaluation)
      : h('p', {class: 'muted'}, 'No evaluation stored: `peftkit eval ' + e.ref + '` adds one.'),
    h('details', null, h('summary', null, 'Metrics'), kvTable(e.metrics, {skip: ['evaluation', 'data', 'dtype_probe']})),
    h('details', null, h('summary', null, 'Config'), h('pre', {class: 'code'}, JSON.stringify(e.config, null, 2)))));
}

async function change(action, done) {
  statusEl.textContent = 'working…';
  statusEl.className = 'status';
  try {
    const result = await action();
    statusEl.textContent = done(result);
    statusEl.className = 'status ok';
  } catch (error) {
    statusEl.textContent = error.message;
    statusEl.className = 'status error';
  }
  await load();
}

async function tag(e) {
  const name = await ask({title: 'Tag ' + e.ref, input: 'tag',
    body: 'A tag names one version of ' + e.name + ' at a time: giving it to ' + e.ref + ' moves it from any other version.',
    confirm: 'Tag'});
  if (!name) return;
  change(() => api('/dashboard/api/registry/' + enc(e.ref) + '/tag', {method: 'POST', query: {tag: name}}),
    r => e.name + ':' + name + ' → ' + r.ref);
}

async function untag(e, t) {
  change(() => api('/dashboard/api/registry/' + enc(e.name + ':' + t) + '/untag', {method: 'POST'}),
    r => 'untagged ' + e.name + ':' + t + ' (was ' + r.ref + ')');
}

async function remove(e) {
  const sure = await ask({title: 'Remove ' + e.ref + '?', danger: true, confirm: 'Remove',
    body: 'This deletes version ' + e.version + ' of ' + e.name + ' from the registry (its tags go with it; files no ' +
      'other version uses are freed). It cannot be undone.'});
  if (!sure) return;
  if (selected === e.ref) location.hash = '#registry';
  change(() => api('/dashboard/api/registry/' + enc(e.ref) + '/remove', {method: 'POST'}), r => 'removed ' + r.removed.join(', '));
}

async function verifyOne(e) {
  change(() => api('/dashboard/api/registry/' + enc(e.ref) + '/verify', {method: 'POST'}), r => {
    verified[e.ref] = r;
    return e.ref + (r.ok ? ': every file hashes as registered' : ': ' + r.problems.length + ' problems');
  });
}

async function verifyAll() {
  change(() => api('/dashboard/api/verify', {method: 'POST'}), r => {
    verified = {};
    for (const e of entries) verified[e.ref] = {ok: true, problems: []};
    for (const p of r.problems) (verified[p.ref] ||= {ok: false, problems: []}).problems.push(p);
    for (const v of Object.values(verified)) v.ok = !v.problems.length;
    return r.ok ? 'verified ' + r.files + ' files of ' + r.entries + ' versions: all as registered'
      : r.problems.length + ' problems: ' + r.problems.map(p => p.ref + ' ' + p.path + ' ' + p.kind).join('; ');
  });
}
