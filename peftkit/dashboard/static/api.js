// Talking to the server: the API key lives in this tab's sessionStorage and goes out as a Bearer header.

const STORE = 'peftkit-api-key';

export const session = {
  key: sessionStorage.getItem(STORE) || '',
  info: null,
  setKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem(STORE, key); else sessionStorage.removeItem(STORE);
  },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function authHeaders(extra = {}) {
  return session.key ? {...extra, Authorization: 'Bearer ' + session.key} : {...extra};
}

// GET (or POST with method: 'POST') a JSON route; throws ApiError with the server's message.
// A 401 anywhere means the key is gone or wrong: the page goes back to the login form.
export async function api(path, {method = 'GET', query = null, signal} = {}) {
  const url = query ? path + '?' + new URLSearchParams(query) : path;
  const headers = authHeaders(method === 'GET' ? {} : {'X-Peftkit-Page': '1'});
  const response = await fetch(url, {method, headers, signal});
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = (body && body.error && body.error.message) || response.statusText || 'request failed';
    if (response.status === 401) window.dispatchEvent(new CustomEvent('peftkit:unauthorized', {detail: message}));
    throw new ApiError(response.status, message);
  }
  return body;
}

export function enc(part) {
  return encodeURIComponent(part);
}
