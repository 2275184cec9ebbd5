#!/usr/bin/env node
// The independent OpenID Connect relying party of the end-to-end tests (tests/oidc_e2e.rs).
//
// The protocol side is npm `openid-client` v6 (discovery, authorization URL, PKCE, code grant
// with ID token validation, refresh, userinfo, end-session URL); ID token signatures are checked
// against the provider's JWKS (`enableNonRepudiationChecks`), access and logout tokens with `jose`.
// The browser side is a small fetch-based user agent: a cookie jar kept in a JSON file between
// invocations (so that single sign-on across applications can be tested), `redirect: 'manual'`
// with the redirects followed here, and the provider's HTML forms parsed and posted like a
// browser (application/x-www-form-urlencoded, every hidden input such as `csrf_token`,
// `return_to` and `request` sent back as received). The emailed 6-digit code is read from the
// SMTP sink's directory (tests/e2e/smtp_sink.py writes NNNN.json per message); TOTP codes are
// computed here (RFC 6238: SHA-1, 30 s, 6 digits).
//
//   node oidc_rp.mjs COMMAND 'JSON'
//
// prints one JSON object on one line and exits 0 (a failure is reported in the object:
// `ok: false` and `error`); exit 2 is a bug or misuse of this script.
//
// Commands and their argument (every one takes `issuer`):
//   discover     {}                                    -> {metadata}
//   login        {client, redirect_uri, scope, jar, user?, sink_dir?, params?, consent?,
//                 pkce? (default true), redeem? (default true), confirm_logout?}
//                full authorization code flow: the browser goes through login, second factor
//                and consent as needed; -> {trace, stop, callback, state, nonce, code_verifier,
//                tokens, id_token_header, id_token_claims, at_hash_expected, access_token_header,
//                access_token_claims (verified against the JWKS), userinfo}
//   refresh      {client, refresh_token}                -> {tokens, id_token_claims?}
//   userinfo     {client, access_token, sub?}           -> {userinfo}
//   logout       {client, jar, id_token_hint?, post_logout_redirect_uri?, state?, params?,
//                 confirm_logout?, raw_url?}            -> {trace, stop}
//   browse       {url, jar, user?, sink_dir?, consent?, register?, confirm_logout?, also_origins?}
//                                                       -> {trace, stop}
//                `also_origins`: other origins whose redirects are followed too (a gateway's
//                browser sign-in goes there and back); with it every request accepts
//                `text/html` as a navigation does (Node's fetch always sends
//                `Sec-Fetch-Mode: cors`, and no `Sec-Fetch-Dest`). Their TLS is trusted
//                through NODE_EXTRA_CA_CERTS.
//   totp-enrol   {jar, user, sink_dir?}                 -> {secret, step, trace, stop}
//   submit       {url, jar, pick: {field?|action?}, set?: {}, remove?: [], button?}
//                fetch a page, change its form and post it once, without following
//                -> {trace, response: {status, location, set_cookie, x_error}}
//   verify-jwt   {token, typ?, audience?}              -> {header, claims} (signature, iss)
//
// `client`: {client_id, auth: client_secret_basic|client_secret_post|none|private_key_jwt,
// client_secret?, key_file? (PKCS#8 PEM), key_alg?, kid?, id_token_signed_response_alg?}
// `user`: {email, password, totp_secret?, totp_after_step?}

import * as client from 'openid-client';
import * as jose from 'jose';
import { createHash, createHmac } from 'node:crypto';
import { readFileSync, writeFileSync, readdirSync, existsSync, renameSync } from 'node:fs';
import { join } from 'node:path';

const MAX_HOPS = 40;
const MAIL_WAIT_MS = 20000;

class Stop extends Error {}

// ------------------------------------------------------------------------------ helpers --

function b64url(buf) {
  return Buffer.from(buf).toString('base64url');
}

function decodeJwt(token) {
  const [h, p] = String(token).split('.');
  return { header: JSON.parse(Buffer.from(h, 'base64url')), claims: JSON.parse(Buffer.from(p, 'base64url')) };
}

/** RFC 6238 TOTP (SHA-1, 30 s, 6 digits) of a base32 secret at time step `step`. */
function totp(secretB32, step) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  const clean = secretB32.toUpperCase().replace(/[\s=-]/g, '');
  let bits = '';
  for (const ch of clean) {
    const v = alphabet.indexOf(ch);
    if (v < 0) throw new Error(`not base32: ${secretB32}`);
    bits += v.toString(2).padStart(5, '0');
  }
  const bytes = [];
  for (let i = 0; i + 8 <= bits.length; i += 8) bytes.push(parseInt(bits.slice(i, i + 8), 2));
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const mac = createHmac('sha1', Buffer.from(bytes)).update(counter).digest();
  const off = mac[mac.length - 1] & 0x0f;
  const bin = ((mac[off] & 0x7f) << 24) | (mac[off + 1] << 16) | (mac[off + 2] << 8) | mac[off + 3];
  return String(bin % 1000000).padStart(6, '0');
}

const nowStep = () => Math.floor(Date.now() / 1000 / 30);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** OIDC Core 3.1.3.6: the left half of the hash of the access token, per the ID token's alg. */
function atHash(accessToken, alg) {
  const hash = { RS256: 'sha256', ES256: 'sha256', PS256: 'sha256', RS384: 'sha384', ES384: 'sha384',
    PS384: 'sha384', RS512: 'sha512', ES512: 'sha512', PS512: 'sha512', EdDSA: 'sha512' }[alg];
  if (!hash) return null;
  const d = createHash(hash).update(accessToken, 'ascii').digest();
  return b64url(d.subarray(0, d.length / 2));
}

function errorJson(e) {
  const out = { name: e?.name, message: e?.message, code: e?.code };
  if (e?.error !== undefined) out.error = e.error;
  if (e?.error_description !== undefined) out.error_description = e.error_description;
  if (e?.status !== undefined) out.status = e.status;
  if (e?.cause && typeof e.cause === 'object') {
    try {
      out.cause = JSON.parse(JSON.stringify(e.cause, (k, v) => (v instanceof URLSearchParams ? Object.fromEntries(v) : v)));
    } catch {
      out.cause = String(e.cause);
    }
    if (e.cause instanceof URLSearchParams) out.cause = Object.fromEntries(e.cause);
  }
  return out;
}

// ---------------------------------------------------------------------------------- HTML --

function decodeEntities(s) {
  return s
    .replace(/&#x([0-9a-f]+);/gi, (_, h) => String.fromCodePoint(parseInt(h, 16)))
    .replace(/&#([0-9]+);/g, (_, d) => String.fromCodePoint(parseInt(d, 10)))
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}

function attrs(s) {
  const out = {};
  const re = /([a-zA-Z_:][-a-zA-Z0-9_:.]*)\s*(?:=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?/g;
  let m;
  while ((m = re.exec(s))) {
    out[m[1].toLowerCase()] = decodeEntities(m[2] ?? m[3] ?? m[4] ?? '');
  }
  return out;
}

/** Every form of the page: action (absolute), method, fields (name → value), buttons. */
function parseForms(html, pageUrl) {
  const forms = [];
  const re = /<form\b([^>]*)>([\s\S]*?)<\/form>/gi;
  let m;
  while ((m = re.exec(html))) {
    const a = attrs(m[1]);
    const body = m[2];
    const fields = [];
    const buttons = [];
    const inputs = /<(input|button|textarea)\b([^>]*)>(?:([\s\S]*?)<\/textarea>)?/gi;
    let i;
    while ((i = inputs.exec(body))) {
      const tag = i[1].toLowerCase();
      const ia = attrs(i[2]);
      const type = (ia.type || (tag === 'button' ? 'submit' : 'text')).toLowerCase();
      if (tag === 'button' || type === 'submit' || type === 'image') {
        buttons.push({ name: ia.name ?? null, value: ia.value ?? '' });
        continue;
      }
      if (!ia.name || ia.disabled !== undefined) continue;
      if ((type === 'checkbox' || type === 'radio') && ia.checked === undefined) continue;
      const value = tag === 'textarea' ? decodeEntities(i[3] ?? '') : ia.value ?? '';
      fields.push([ia.name, value, type]);
    }
    forms.push({
      action: new URL(a.action ?? '', pageUrl).href,
      method: (a.method || 'GET').toUpperCase(),
      fields,
      buttons,
    });
  }
  return forms;
}

function text(html) {
  return decodeEntities(
    html
      .replace(/<(script|style)\b[\s\S]*?<\/\1>/gi, ' ')
      .replace(/<[^>]+>/g, ' ')
      .replace(/\s+/g, ' ')
      .trim(),
  );
}

// ------------------------------------------------------------------------------ cookies --

class Jar {
  constructor(file) {
    this.file = file;
    this.cookies = {};
    if (file && existsSync(file)) this.cookies = JSON.parse(readFileSync(file, 'utf8')).cookies ?? {};
  }
  save() {
    if (!this.file) return;
    writeFileSync(`${this.file}.tmp`, JSON.stringify({ cookies: this.cookies }));
    renameSync(`${this.file}.tmp`, this.file);
  }
  header(url) {
    const u = new URL(url);
    const now = Date.now() / 1000;
    return Object.entries(this.cookies)
      .filter(([, c]) => (c.expires == null || c.expires > now) && u.pathname.startsWith(c.path || '/'))
      .filter(([, c]) => !c.secure || u.protocol === 'https:')
      .map(([n, c]) => `${n}=${c.value}`)
      .join('; ');
  }
  store(setCookies, url) {
    const now = Date.now() / 1000;
    for (const sc of setCookies) {
      const [pair, ...rest] = sc.split(';');
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      const c = { value, path: '/', expires: null, secure: false };
      for (const attr of rest) {
        const [k, ...v] = attr.split('=');
        const key = k.trim().toLowerCase();
        const val = v.join('=').trim();
        if (key === 'path') c.path = val || '/';
        if (key === 'max-age') c.expires = now + Number(val);
        if (key === 'expires' && c.expires == null) c.expires = Date.parse(val) / 1000;
        if (key === 'secure') c.secure = true;
      }
      if (c.expires != null && c.expires <= now) delete this.cookies[name];
      else this.cookies[name] = c;
    }
    void url;
  }
}

// ------------------------------------------------------------------------------ mail --

function mailsTo(dir, email) {
  if (!dir || !existsSync(dir)) return [];
  const out = [];
  for (const name of readdirSync(dir)) {
    const m = /^(\d+)\.json$/.exec(name);
    if (!m) continue;
    const meta = JSON.parse(readFileSync(join(dir, name), 'utf8'));
    const rcpts = (meta.rcpt_tos ?? []).map((r) => r.toLowerCase());
    if (rcpts.includes(email.toLowerCase())) out.push({ n: Number(m[1]), meta });
  }
  return out.sort((a, b) => a.n - b.n);
}

function mailText(meta) {
  const parts = meta.message?.parts ?? [];
  return parts.filter((p) => p.content_type === 'text/plain').map((p) => p.body).join('\n');
}

// ---------------------------------------------------------------------------- the browser --

class Browser {
  constructor(issuer, opts) {
    this.issuer = issuer;
    this.origin = new URL(issuer).origin;
    this.opts = opts;
    this.jar = new Jar(opts.jar);
    this.trace = [];
    this.handled = {};
    this.user = opts.user ?? null;
    this.alsoOrigins = new Set(opts.also_origins ?? []);
    // Mail already there when this run started is never taken for a code.
    this.seenMail = new Set(this.user && opts.sink_dir ? mailsTo(opts.sink_dir, this.user.email).map((m) => m.n) : []);
    this.lastTotpStep = this.user?.totp_after_step ?? null;
    this.usedTotpStep = null;
  }

  async request(method, url, body) {
    const headers = { 'user-agent': 'portcullis-oidc-e2e/1' };
    if (this.alsoOrigins.size > 0) {
      headers.accept = 'text/html,application/xhtml+xml;q=0.9,*/*;q=0.8';
    }
    const cookie = this.jar.header(url);
    if (cookie) headers.cookie = cookie;
    if (body !== undefined) headers['content-type'] = 'application/x-www-form-urlencoded';
    const res = await fetch(url, { method, headers, body, redirect: 'manual' });
    const setCookies = res.headers.getSetCookie();
    this.jar.store(setCookies, url);
    const ctype = res.headers.get('content-type') ?? '';
    const textBody = await res.text();
    const u = new URL(url);
    const entry = {
      method,
      url,
      path: u.pathname,
      status: res.status,
      location: res.headers.get('location'),
      content_type: ctype,
      csp: res.headers.get('content-security-policy'),
      x_frame_options: res.headers.get('x-frame-options'),
      cache_control: res.headers.get('cache-control'),
      referrer_policy: res.headers.get('referrer-policy'),
      x_error: res.headers.get('x-error'),
      x_error_id: res.headers.get('x-error-id'),
      set_cookie: setCookies,
      html: ctype.startsWith('text/html'),
    };
    if (entry.html) {
      entry.inline_script = /<script\b(?![^>]*\bsrc\s*=)[^>]*>/i.test(textBody);
      entry.title = (/<title>([\s\S]*?)<\/title>/i.exec(textBody)?.[1] ?? '').trim();
    }
    this.trace.push(entry);
    return { entry, body: textBody };
  }

  isCallback(url) {
    const r = this.opts.redirect_uri;
    if (!r) return false;
    const a = new URL(url);
    const b = new URL(r);
    return a.origin === b.origin && a.pathname === b.pathname;
  }

  page(entry, body, kind) {
    const forms = entry.html ? parseForms(body, entry.url) : [];
    return {
      kind,
      url: entry.url,
      path: entry.path,
      status: entry.status,
      x_error: entry.x_error,
      x_error_id: entry.x_error_id,
      location: entry.location,
      title: entry.title ?? null,
      text: entry.html ? text(body).slice(0, 2000) : body.slice(0, 2000),
      forms: forms.map((f) => ({ action: f.action, method: f.method, fields: f.fields.map(([n, v]) => [n, v]), buttons: f.buttons })),
    };
  }

  /** Follows redirects and fills the known forms until the callback, an outside URL or a page it does not handle. */
  async navigate(url, method = 'GET', body = undefined) {
    for (let hop = 0; hop < MAX_HOPS; hop++) {
      const { entry, body: resBody } = await this.request(method, url, body);
      if ([301, 302, 303, 307, 308].includes(entry.status) && entry.location) {
        const next = new URL(entry.location, url).href;
        if (this.isCallback(next)) {
          return { kind: 'callback', url: next, params: Object.fromEntries(new URL(next).searchParams), method: 'GET' };
        }
        if (new URL(next).origin !== this.origin && !this.alsoOrigins.has(new URL(next).origin)) {
          return { kind: 'external', url: next, params: Object.fromEntries(new URL(next).searchParams) };
        }
        if (entry.status === 307 || entry.status === 308) {
          url = next;
        } else {
          url = next;
          method = 'GET';
          body = undefined;
        }
        continue;
      }
      if (!entry.html || entry.status >= 400) return this.page(entry, resBody, entry.status >= 400 ? 'error' : 'page');
      const forms = parseForms(resBody, entry.url);
      const action = await this.handle(entry, resBody, forms);
      if (!action) return this.page(entry, resBody, 'page');
      if (action.callback) return action.callback;
      ({ url, method, body } = action);
    }
    throw new Stop(`more than ${MAX_HOPS} hops`);
  }

  countHandled(kind) {
    this.handled[kind] = (this.handled[kind] ?? 0) + 1;
    if (this.handled[kind] > 3) throw new Stop(`the ${kind} page came back again and again`);
  }

  submission(form, values, button) {
    const params = new URLSearchParams();
    const set = new Set(Object.keys(values));
    for (const [n, v] of form.fields) {
      if (set.has(n)) continue;
      params.append(n, v);
    }
    for (const [n, v] of Object.entries(values)) params.append(n, v);
    if (button?.name) params.append(button.name, button.value);
    if (form.method === 'GET') {
      const u = new URL(form.action);
      for (const [n, v] of params) u.searchParams.append(n, v);
      return { url: u.href, method: 'GET', body: undefined };
    }
    return { url: form.action, method: 'POST', body: params.toString() };
  }

  formWith(forms, pred) {
    return forms.find(pred);
  }

  async mailedCode() {
    if (!this.user || !this.opts.sink_dir) throw new Stop('a code page, but no user or sink_dir to read the code from');
    const deadline = Date.now() + MAIL_WAIT_MS;
    for (;;) {
      for (const m of mailsTo(this.opts.sink_dir, this.user.email)) {
        if (this.seenMail.has(m.n)) continue;
        const codes = [...new Set(mailText(m.meta).match(/(?<![0-9])[0-9]{6}(?![0-9])/g) ?? [])];
        this.seenMail.add(m.n);
        if (codes.length === 1) return codes[0];
      }
      if (Date.now() > deadline) throw new Stop(`no new mail with a code to ${this.user.email} within ${MAIL_WAIT_MS} ms`);
      await sleep(50);
    }
  }

  async totpCode() {
    if (!this.user?.totp_secret) throw new Stop('a TOTP page, but the user has no totp_secret');
    // A code is accepted once: wait for a time step after the last one used.
    while (this.lastTotpStep != null && nowStep() <= this.lastTotpStep) await sleep(200);
    const step = nowStep();
    this.lastTotpStep = step;
    this.usedTotpStep = step;
    return totp(this.user.totp_secret, step);
  }

  /** What to do on an HTML page: the next request, a callback, or null (stop here). */
  async handle(entry, body, forms) {
    const path = entry.path;
    const o = this.opts;
    // response_mode=form_post: the auto-submitting form back to the application.
    const fp = o.redirect_uri && forms.find((f) => this.isCallback(f.action));
    if (fp) {
      return { callback: { kind: 'callback', url: fp.action, method: fp.method, params: Object.fromEntries(fp.fields.map(([n, v]) => [n, v])) } };
    }
    const consent = forms.find((f) => new URL(f.action).pathname === '/oauth2/consent');
    if (consent) {
      entry.page = 'consent';
      if (!o.consent) return null;
      this.countHandled('consent');
      const button = consent.buttons.find((b) => b.name === 'decision' && b.value === o.consent);
      const values = button ? {} : { decision: o.consent };
      return this.submission(consent, values, button);
    }
    if (path === '/login') {
      const f = forms.find((f) => f.fields.some(([n]) => n === 'password'));
      if (!f || !this.user) return null;
      entry.page = 'login';
      this.countHandled('login');
      return this.submission(f, { email: this.user.email, password: this.user.password });
    }
    if (path === '/login/code') {
      const f = forms.find((f) => f.fields.some(([n]) => n === 'code'));
      if (!f) return null;
      entry.page = 'code';
      this.countHandled('code');
      return this.submission(f, { code: await this.mailedCode() });
    }
    if (path === '/login/totp') {
      const f = forms.find((f) => f.fields.some(([n]) => n === 'code'));
      if (!f) return null;
      entry.page = 'totp';
      this.countHandled('totp');
      return this.submission(f, { code: await this.totpCode() });
    }
    if (path === '/invite') {
      const f = forms.find((f) => f.fields.some(([n]) => n === 'password_confirm'));
      if (!f || !this.user) return null;
      entry.page = 'invite';
      this.countHandled('invite');
      return this.submission(f, { password: this.user.password, password_confirm: this.user.password });
    }
    if (path === '/register' && o.register) {
      const f = forms.find((f) => f.fields.some(([n]) => n === 'email'));
      if (!f) return null;
      entry.page = 'register';
      this.countHandled('register');
      return this.submission(f, o.register);
    }
    if (path === '/oauth2/logout' && o.confirm_logout) {
      const f = forms.find((f) => f.fields.some(([n]) => n === 'csrf_token'));
      if (!f) return null;
      entry.page = 'logout-confirmation';
      this.countHandled('logout');
      return this.submission(f, {});
    }
    return null;
  }
}

// ------------------------------------------------------------------------------ the RP --

async function config(issuer, c) {
  const metadata = { client_id: c.client_id };
  if (c.id_token_signed_response_alg) metadata.id_token_signed_response_alg = c.id_token_signed_response_alg;
  let auth;
  switch (c.auth) {
    case 'none':
      auth = client.None();
      metadata.token_endpoint_auth_method = 'none';
      break;
    case 'client_secret_post':
      auth = client.ClientSecretPost(c.client_secret);
      metadata.client_secret = c.client_secret;
      break;
    case 'private_key_jwt': {
      const key = await jose.importPKCS8(readFileSync(c.key_file, 'utf8'), c.key_alg ?? 'ES256');
      auth = client.PrivateKeyJwt(c.kid ? { key, kid: c.kid } : key);
      break;
    }
    case 'client_secret_basic':
    case undefined:
      auth = client.ClientSecretBasic(c.client_secret);
      metadata.client_secret = c.client_secret;
      break;
    default:
      throw new Error(`unknown client auth ${c.auth}`);
  }
  return client.discovery(new URL(issuer), c.client_id, metadata, auth, {
    execute: [client.allowInsecureRequests, client.enableNonRepudiationChecks],
  });
}

let jwksCache = null;
async function verifyJwt(issuer, token, { typ, audience } = {}) {
  jwksCache ??= jose.createRemoteJWKSet(new URL(`${issuer}/oauth2/jwks`));
  const opts = { issuer };
  if (typ) opts.typ = typ;
  if (audience) opts.audience = audience;
  const { payload, protectedHeader } = await jose.jwtVerify(token, jwksCache, opts);
  return { header: protectedHeader, claims: payload };
}

function tokensJson(t) {
  const out = {};
  for (const k of ['access_token', 'id_token', 'refresh_token', 'token_type', 'expires_in', 'scope']) {
    if (t[k] !== undefined) out[k] = t[k];
  }
  return out;
}

async function cmdLogin(a) {
  const cfg = await config(a.issuer, a.client);
  const state = client.randomState();
  const nonce = client.randomNonce();
  const verifier = client.randomPKCECodeVerifier();
  const params = { redirect_uri: a.redirect_uri, scope: a.scope ?? 'openid', state, nonce };
  if (a.pkce !== false) {
    params.code_challenge = await client.calculatePKCECodeChallenge(verifier);
    params.code_challenge_method = 'S256';
  }
  Object.assign(params, a.params ?? {});
  const url = client.buildAuthorizationUrl(cfg, params);
  const b = new Browser(a.issuer, a);
  const out = { state, nonce, code_verifier: a.pkce !== false ? verifier : null, authorization_url: url.href };
  try {
    const stop = await b.navigate(url.href);
    out.stop = stop;
    if (stop.kind !== 'callback') return { ok: false, error: { message: `the browser stopped at ${stop.kind} ${stop.url}` }, ...out, trace: b.trace };
    out.callback = stop.params;
    if (stop.params.error || a.redeem === false) return { ok: !stop.params.error, ...out, trace: b.trace };
    const checks = { expectedState: state, expectedNonce: nonce, idTokenExpected: true };
    if (a.pkce !== false) checks.pkceCodeVerifier = verifier;
    if (params.max_age !== undefined) checks.maxAge = Number(params.max_age);
    let current;
    if (stop.method === 'POST') {
      current = new Request(stop.url, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams(stop.params).toString() });
    } else {
      current = new URL(stop.url);
    }
    const tokens = await client.authorizationCodeGrant(cfg, current, checks);
    out.tokens = tokensJson(tokens);
    out.id_token_claims = tokens.claims();
    const idt = decodeJwt(tokens.id_token);
    out.id_token_header = idt.header;
    out.at_hash_expected = atHash(tokens.access_token, idt.header.alg);
    const at = await verifyJwt(a.issuer, tokens.access_token, { typ: 'at+jwt' });
    out.access_token_header = at.header;
    out.access_token_claims = at.claims;
    out.userinfo = await client.fetchUserInfo(cfg, tokens.access_token, out.id_token_claims.sub);
    return { ok: true, ...out, trace: b.trace };
  } catch (e) {
    if (e instanceof Stop || e?.name) return { ok: false, error: errorJson(e), ...out, trace: b.trace };
    throw e;
  } finally {
    b.jar.save();
  }
}

async function cmdRefresh(a) {
  const cfg = await config(a.issuer, a.client);
  try {
    const tokens = await client.refreshTokenGrant(cfg, a.refresh_token);
    const out = { ok: true, tokens: tokensJson(tokens) };
    if (tokens.id_token) out.id_token_claims = tokens.claims();
    return out;
  } catch (e) {
    return { ok: false, error: errorJson(e) };
  }
}

async function cmdUserinfo(a) {
  const cfg = await config(a.issuer, a.client);
  try {
    const sub = a.sub ?? decodeJwt(a.access_token).claims.sub;
    return { ok: true, userinfo: await client.fetchUserInfo(cfg, a.access_token, sub) };
  } catch (e) {
    return { ok: false, error: errorJson(e) };
  }
}

async function cmdLogout(a) {
  let url;
  if (a.raw_url) {
    url = new URL(a.raw_url);
  } else {
    const cfg = await config(a.issuer, a.client);
    const p = {};
    if (a.id_token_hint) p.id_token_hint = a.id_token_hint;
    if (a.post_logout_redirect_uri) p.post_logout_redirect_uri = a.post_logout_redirect_uri;
    if (a.state) p.state = a.state;
    Object.assign(p, a.params ?? {});
    url = client.buildEndSessionUrl(cfg, p);
  }
  const b = new Browser(a.issuer, a);
  try {
    const stop = await b.navigate(url.href);
    return { ok: true, url: url.href, stop, trace: b.trace };
  } catch (e) {
    return { ok: false, url: url.href, error: errorJson(e), trace: b.trace };
  } finally {
    b.jar.save();
  }
}

async function cmdBrowse(a) {
  const b = new Browser(a.issuer, a);
  try {
    const stop = await b.navigate(new URL(a.url, a.issuer).href);
    return { ok: true, stop, trace: b.trace };
  } catch (e) {
    return { ok: false, error: errorJson(e), trace: b.trace };
  } finally {
    b.jar.save();
  }
}

/** The base32 secret on the enrolment page: from an otpauth:// URI, else the key shown by hand. */
function findSecret(body) {
  const uri = /otpauth:\/\/totp\/[^"'<>\s]*/i.exec(decodeEntities(body));
  if (uri) {
    const s = new URL(decodeEntities(uri[0])).searchParams.get('secret');
    if (s) return s;
  }
  const code = /<code\b[^>]*class="[^"]*\bsecret\b[^"]*"[^>]*>([^<]*)<\/code>/i.exec(body);
  if (code) return decodeEntities(code[1]).replace(/\s+/g, '');
  const m = /\b(?:[A-Z2-7]{4} ?){4,}[A-Z2-7]*=*/.exec(text(body));
  return m ? m[0].replace(/\s+/g, '') : null;
}

async function cmdTotpEnrol(a) {
  const b = new Browser(a.issuer, a);
  try {
    let stop = await b.navigate(new URL('/account/totp', a.issuer).href);
    if (stop.path !== '/account/totp' || stop.kind !== 'page') {
      return { ok: false, error: { message: `expected the enrolment page, got ${stop.kind} ${stop.url}` }, stop, trace: b.trace };
    }
    // The page again, to read the secret from its HTML (navigate keeps only text).
    const { entry, body } = await b.request('GET', stop.url);
    const secret = findSecret(body);
    if (!secret) return { ok: false, error: { message: 'no secret on the enrolment page' }, stop: b.page(entry, body, 'page'), trace: b.trace };
    const form = parseForms(body, entry.url).find((f) => f.fields.some(([n]) => n === 'code'));
    if (!form) return { ok: false, error: { message: 'no code field on the enrolment page' }, secret, trace: b.trace };
    const step = nowStep();
    const sub = b.submission(form, { code: totp(secret, step) });
    stop = await b.navigate(sub.url, sub.method, sub.body);
    return { ok: true, secret, step, stop, trace: b.trace };
  } catch (e) {
    return { ok: false, error: errorJson(e), trace: b.trace };
  } finally {
    b.jar.save();
  }
}

async function cmdSubmit(a) {
  const b = new Browser(a.issuer, a);
  try {
    const { entry, body } = await b.request('GET', new URL(a.url, a.issuer).href);
    const forms = parseForms(body, entry.url);
    const pick = a.pick ?? {};
    const form = forms.find(
      (f) => (!pick.field || f.fields.some(([n]) => n === pick.field)) && (!pick.action || new URL(f.action).pathname === pick.action),
    );
    if (!form) return { ok: false, error: { message: 'no such form' }, page: b.page(entry, body, 'page'), trace: b.trace };
    form.fields = form.fields.filter(([n]) => !(a.remove ?? []).includes(n) && !(n in (a.set ?? {})));
    const button = a.button ? form.buttons.find((x) => x.name === a.button[0] && x.value === a.button[1]) ?? { name: a.button[0], value: a.button[1] } : undefined;
    const sub = b.submission(form, a.set ?? {}, button);
    const r = await b.request(sub.method, sub.url, sub.body);
    return { ok: true, form, response: { ...r.entry, text: r.entry.html ? text(r.body).slice(0, 2000) : r.body.slice(0, 2000) }, trace: b.trace };
  } catch (e) {
    return { ok: false, error: errorJson(e), trace: b.trace };
  } finally {
    b.jar.save();
  }
}

async function main() {
  const [cmd, arg] = process.argv.slice(2);
  const a = JSON.parse(arg ?? '{}');
  if (!a.issuer) throw new Error('issuer is required');
  let out;
  switch (cmd) {
    case 'discover': {
      const cfg = await client.discovery(new URL(a.issuer), 'discovery-only', undefined, undefined, { execute: [client.allowInsecureRequests] });
      out = { ok: true, metadata: cfg.serverMetadata() };
      break;
    }
    case 'login':
      out = await cmdLogin(a);
      break;
    case 'refresh':
      out = await cmdRefresh(a);
      break;
    case 'userinfo':
      out = await cmdUserinfo(a);
      break;
    case 'logout':
      out = await cmdLogout(a);
      break;
    case 'browse':
      out = await cmdBrowse(a);
      break;
    case 'totp-enrol':
      out = await cmdTotpEnrol(a);
      break;
    case 'submit':
      out = await cmdSubmit(a);
      break;
    case 'verify-jwt':
      try {
        out = { ok: true, ...(await verifyJwt(a.issuer, a.token, a)) };
      } catch (e) {
        out = { ok: false, error: errorJson(e) };
      }
      break;
    default:
      throw new Error(`unknown command ${cmd}`);
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ ok: false, fatal: true, error: errorJson(e), stack: e?.stack }) + '\n');
  process.exit(2);
});
