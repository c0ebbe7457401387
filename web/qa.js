// whipcast audience Q&A in the browser: the API client and the question list.
//
// Live updates are server-sent events read with fetch() rather than EventSource, so the
// host's requests can carry the publish token in an Authorization header. Every
// reconnect starts from a fresh snapshot, so nothing said while away is missed.
// All user text is put on the page with textContent, never as HTML.
//
//   const qa = new QAClient('demo', { onChange: () => panel.render(qa.questions) });
//   qa.start();  await qa.ask('Ada', 'Which codec?');  await qa.vote(id);

import { formatDuration } from './page.js';

export const MAX_TEXT = 500;
export const MAX_NAME = 40;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15000;
const SILENCE_LIMIT_MS = 45000; // the server sends a heartbeat every 15 s

/** A failed Q&A request, with the server's problem+json detail and Retry-After. */
export class QAError extends Error {
  constructor(message, status = 0, retryAfter = null) {
    super(message);
    this.name = 'QAError';
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export class QAClient {
  /**
   * @param {string} stream
   * @param {object} [options]
   * @param {string} [options.token] Publish token: host view (hidden questions) and moderation.
   * @param {boolean} [options.host] Ask for the host view (needs the token if one is set).
   * @param {() => void} [options.onChange] Called after any question changed.
   * @param {(state: string, detail?: string) => void} [options.onConnection]
   *   'connecting', 'open', 'offline' (no Q&A for this stream: not live), 'error'.
   */
  constructor(stream, { token = '', host = false, onChange = () => {}, onConnection = () => {} } = {}) {
    this.stream = stream;
    this.host = host;
    this.token = token;
    /** Questions by id, as the server last described them. */
    this.questions = new Map();
    /** Ids this client has voted for. */
    this.voted = new Set();
    /** Whether the stream takes new questions (it is live). */
    this.open = false;
    this._onChange = onChange;
    this._onConnection = onConnection;
    this._abort = null;
    this._stopped = true;
    this._connected = false;
  }

  get base() { return `/api/streams/${encodeURIComponent(this.stream)}/questions`; }

  start() {
    this._stopped = false;
    this._listen();
    return this;
  }

  stop() {
    this._stopped = true;
    this._abort?.abort();
  }

  /** Post a question; resolves with it once the server saved it in Kafka (or with
   * `{accepted: true}` if saved but not yet read back: the live updates bring it). */
  async ask(name, text) {
    const question = await this._request('POST', this.base, { name, text });
    if (question?.id) this._merge(question);
    return question;
  }

  async vote(id) {
    const question = await this._request('POST', `${this.base}/${encodeURIComponent(id)}/vote`);
    this.voted.add(id);
    if (question?.id) this._merge(question);
    else this._onChange();
    return question;
  }

  /** Host only: set pinned / answered / hidden. */
  async moderate(id, flags) {
    const question = await this._request('PATCH', `${this.base}/${encodeURIComponent(id)}`, flags);
    if (question?.id) this._merge(question);
    return question;
  }

  /** Questions in display order: pinned, open by votes, then answered. */
  sorted() {
    return [...this.questions.values()].sort((a, b) =>
      (b.pinned - a.pinned) || (a.answered - b.answered) || (b.votes - a.votes)
      || (a.created_at - b.created_at));
  }

  _headers(extra = {}) {
    const headers = { ...extra };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  async _request(method, url, body) {
    const init = { method, headers: this._headers(), credentials: 'same-origin' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      throw new QAError(`Cannot reach the server: ${err.message}`);
    }
    if (!response.ok) throw await problem(response);
    return response.json();
  }

  _merge(question) {
    if (question.voted) this.voted.add(question.id);
    if (question.hidden && !this.host) this.questions.delete(question.id);
    else this.questions.set(question.id, question);
    this._onChange();
  }

  async _listen() {
    let delay = RETRY_MIN_MS;
    const url = this.host ? `${this.base}/events?view=host` : `${this.base}/events`;
    while (!this._stopped) {
      const abort = this._abort = new AbortController();
      let silence = 0;
      const resetWatchdog = () => {
        clearTimeout(silence);
        silence = setTimeout(() => abort.abort(), SILENCE_LIMIT_MS);
      };
      try {
        this._onConnection('connecting');
        resetWatchdog();
        const response = await fetch(url, {
          headers: this._headers({ Accept: 'text/event-stream' }),
          credentials: 'same-origin',
          cache: 'no-store',
          signal: abort.signal,
        });
        if (!response.ok) throw await problem(response);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          resetWatchdog();
          buffer += value;
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            this._dispatch(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
          }
          if (this._connected) delay = RETRY_MIN_MS;
        }
        if (!this._stopped) this._onConnection('error', 'Live updates were interrupted');
      } catch (err) {
        if (this._stopped) break;
        if (err?.status === 404) this._onConnection('offline', err.message);
        else this._onConnection('error', err?.message || String(err));
      } finally {
        clearTimeout(silence);
        this._connected = false;
      }
      await new Promise((resolve) => setTimeout(resolve, delay * (0.8 + Math.random() * 0.4)));
      delay = Math.min(delay * 2, RETRY_MAX_MS);
    }
  }

  _dispatch(block) {
    let event = 'message';
    let data = '';
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) event = line.slice(6).trim();
      else if (line.startsWith('data:')) data += line.slice(5).trimStart();
    }
    if (!data) return; // a heartbeat comment
    const payload = JSON.parse(data);
    if (event === 'snapshot') {
      this.questions = new Map(payload.questions.map((q) => [q.id, q]));
      this.voted = new Set(payload.questions.filter((q) => q.voted).map((q) => q.id));
      this.open = payload.open;
      this._connected = true;
      this._onConnection('open');
      this._onChange();
    } else if (event === 'question') {
      this._merge(payload);
    } else if (event === 'removed') {
      this.questions.delete(payload.id);
      this._onChange();
    }
  }
}

/** Turn an error response into a QAError, reading the RFC 9457 problem detail. */
async function problem(response) {
  const retry = Number.parseInt(response.headers.get('Retry-After') || '', 10);
  let detail = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (typeof body?.detail === 'string') detail = body.detail;
  } catch { /* not JSON: keep the status text */ }
  return new QAError(detail, response.status, Number.isFinite(retry) ? retry : null);
}

/**
 * The question list: keyed by id, updated in place (so keyboard focus stays on the
 * button you pressed), ordered like QAClient.sorted().
 *
 * Audience mode shows an upvote button per question; host mode shows Pin / Answered /
 * Hide toggles and keeps hidden questions (dimmed) so they can be restored.
 */
export class QuestionList {
  constructor(list, { host = false, onVote = () => {}, onModerate = () => {} } = {}) {
    this.list = list;
    this.host = host;
    this._onVote = onVote;
    this._onModerate = onModerate;
    this._items = new Map();
  }

  render(questions, voted = new Set()) {
    const keep = new Set(questions.map((q) => q.id));
    for (const [id, item] of this._items) {
      if (!keep.has(id)) {
        item.remove();
        this._items.delete(id);
      }
    }
    let previous = null;
    for (const question of questions) {
      let item = this._items.get(question.id);
      if (!item) {
        item = this._create(question);
        this._items.set(question.id, item);
      }
      this._fill(item, question, voted.has(question.id));
      const wanted = previous ? previous.nextElementSibling : this.list.firstElementChild;
      if (wanted !== item) this.list.insertBefore(item, wanted);
      previous = item;
    }
  }

  _create(question) {
    const item = document.createElement('li');
    item.className = 'question';
    item.dataset.id = question.id;
    item.innerHTML = `
      <div class="q-votes"></div>
      <div class="q-body">
        <p class="q-meta"><span class="q-name"></span><span class="q-when"></span>
          <span class="badge badge-pinned">Pinned</span>
          <span class="badge badge-answered">Answered</span>
          <span class="badge badge-hidden">Hidden</span></p>
        <p class="q-text"></p>
      </div>`;
    const votes = item.querySelector('.q-votes');
    if (this.host) {
      votes.innerHTML = '<span class="vote-count"></span><span class="vote-label">votes</span>';
      const actions = document.createElement('div');
      actions.className = 'q-actions';
      for (const [flag, label] of [['pinned', 'Pin'], ['answered', 'Answered'], ['hidden', 'Hide']]) {
        const button = document.createElement('button');
        button.type = 'button';
        button.className = 'small toggle';
        button.dataset.flag = flag;
        button.textContent = label;
        button.addEventListener('click', () => {
          const on = button.getAttribute('aria-pressed') !== 'true';
          this._onModerate(question.id, { [flag]: on }, button);
        });
        actions.append(button);
      }
      item.querySelector('.q-body').append(actions);
    } else {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'vote';
      button.innerHTML = '<span aria-hidden="true">▲</span><span class="vote-count"></span>';
      button.addEventListener('click', () => this._onVote(question.id, button));
      votes.append(button);
    }
    return item;
  }

  _fill(item, question, voted) {
    item.dataset.pinned = question.pinned;
    item.dataset.answered = question.answered;
    item.dataset.hidden = Boolean(question.hidden);
    item.querySelector('.q-name').textContent = question.name;
    item.querySelector('.q-when').textContent = question.stream_time === null
      || question.stream_time === undefined ? '' : ` · at ${formatDuration(question.stream_time)}`;
    item.querySelector('.q-text').textContent = question.text;
    item.querySelector('.vote-count').textContent = String(question.votes);
    if (this.host) {
      for (const button of item.querySelectorAll('.q-actions button')) {
        const on = Boolean(question[button.dataset.flag]);
        button.setAttribute('aria-pressed', String(on));
        button.setAttribute('aria-label', `${button.textContent}: ${question.text.slice(0, 80)}`);
      }
    } else {
      const button = item.querySelector('.vote');
      button.setAttribute('aria-pressed', String(voted));
      button.disabled = voted;
      button.setAttribute('aria-label', voted
        ? `You voted for this question (${question.votes} votes)`
        : `Upvote this question (${question.votes} votes)`);
    }
  }
}
