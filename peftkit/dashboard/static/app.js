// The page's shell: log in with the API key, then one of three views picked by the URL's #hash
// (#runs/<run id>, #registry/<ref>, #playground). Each view module exports mount(el, arg) and unmount().

import {api, session} from './api.js';
import {fill, h} from './dom.js';
import * as playground from './playground.js';
import * as registry from './registry.js';
import * as runs from './runs.js';

const VIEWS = {runs, registry, playground};
let shown = null;   // [name, module] of the mounted view

function $(id) { return document.getElementById(id); }

async function start() {
  try {
    session.info = await api('/dashboard/api/info');
  } catch (error) {
    if (error.status === 401) return showLogin(session.key ? 'The server refused that key.' : '');
    $('app').hidden = false;
    return fill($('views'), h('p', {class: 'error'}, 'The page could not load its data: ' + error.message));
  }
  $('login').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = !session.key;
  $('where').textContent = 'peftkit ' + session.info.version + (session.info.playground ? ' · serving' : ' · dashboard, no model');
  route();
}

function showLogin(message) {
  unmountView();
  $('app').hidden = true;
  $('logout').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('key').value = '';
  $('key').focus();
}

function route() {
  if (!session.info) return;
  const hash = decodeURIComponent(location.hash.replace(/^#/, ''));
  const [name, ...rest] = hash.split('/');
  const view = VIEWS[name] ? name : 'runs';
  const arg = VIEWS[name] ? rest.join('/') : '';
  for (const link of document.querySelectorAll('#tabs a')) link.classList.toggle('active', link.dataset.tab === view);
  if (shown && shown[0] === view && shown[1].select) return shown[1].select(arg);
  unmountView();
  const el = fill($('views'));
  shown = [view, VIEWS[view]];
  VIEWS[view].mount(el, arg);
}

function unmountView() {
  if (shown) shown[1].unmount();
  shown = null;
}

$('login-form').addEventListener('submit', event => {
  event.preventDefault();
  session.setKey($('key').value.trim());
  start();
});
$('logout').addEventListener('click', () => {
  session.setKey('');
  session.info = null;
  showLogin('');
});
window.addEventListener('hashchange', route);
window.addEventListener('peftkit:unauthorized', () => {
  session.info = null;
  showLogin(session.key ? 'The server refused the key; enter it again.' : '');
});
start();
