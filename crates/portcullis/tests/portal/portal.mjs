// The admin portal in a real browser: Debian's headless Chromium driven by npm
// `playwright-core` (no browser download: executablePath is the system's chromium). Run by
// crates/portcullis/tests/portal_e2e.rs against the real `portcullis serve`:
//
//   node portal.mjs '{"base": "http://127.0.0.1:PORT", "email": "...", "password": "...",
//                     "org": "acme", "sink_dir": "...", "work": "...", "shots": "..."}'
//
// It signs in with the mailed code (read from the SMTP sink's directory, as
// tests/e2e/oidc_rp.mjs does), creates an application through the form (the client id checked
// live, the secret read from the page), runs the whole New Certificate wizard (the openssl
// command copied from the page and run in `work`, the CSR file uploaded, the certificate and
// chain downloaded), revokes the certificate with a reason, invites a user, defines a service
// (a role and a permission), grants the permission to the role, gives the invited user the role
// and finds them among the role's holders, creates an API key (activated with the mailed code)
// and revokes it, and saves screenshots of the main pages to `shots`. It prints one JSON object: what the test checks outside the browser (the
// secret, the downloaded files), every document the browser loaded with its security headers,
// and every console error, page error or CSP violation.

import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const a = JSON.parse(process.argv[2]);
const out = { steps: [], documents: [], problems: [], screenshots: [] };
const MAIL_WAIT_MS = 15000;

function mailsTo(dir, email) {
  if (!existsSync(dir)) return [];
  const found = [];
  for (const name of readdirSync(dir)) {
    const m = /^(\d+)\.json$/.exec(name);
    if (!m) continue;
    const meta = JSON.parse(readFileSync(join(dir, name), 'utf8'));
    const rcpts = (meta.rcpt_tos ?? []).map((r) => r.toLowerCase());
    if (rcpts.includes(email.toLowerCase())) found.push({ n: Number(m[1]), meta });
  }
  return found.sort((x, y) => x.n - y.n);
}

function mailText(meta) {
  return (meta.message?.parts ?? []).filter((p) => p.content_type === 'text/plain').map((p) => p.body).join('\n');
}

/// The code of the first mail to `email` that was not there before (`seen`).
async function mailedCode(seen) {
  const deadline = Date.now() + MAIL_WAIT_MS;
  for (;;) {
    for (const m of mailsTo(a.sink_dir, a.email)) {
      if (seen.has(m.n)) continue;
      const codes = [...new Set(mailText(m.meta).match(/(?<![0-9])[0-9]{6}(?![0-9])/g) ?? [])];
      if (codes.length === 1) return codes[0];
    }
    if (Date.now() > deadline) throw new Error(`no mail with a code to ${a.email} within ${MAIL_WAIT_MS} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function step(name) {
  out.steps.push(name);
}

async function main() {
  if (a.shots) mkdirSync(a.shots, { recursive: true });
  const browser = await chromium.launch({
    executablePath: a.chromium ?? '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  try {
    const context = await browser.newContext({
      acceptDownloads: true,
      viewport: { width: 1280, height: 860 },
      deviceScaleFactor: 1,
      colorScheme: 'light',
    });
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: new URL(a.base).origin });
    const page = await context.newPage();
    page.on('console', (m) => {
      if (m.type() === 'error') out.problems.push(`console: ${m.text()}`);
    });
    page.on('pageerror', (e) => out.problems.push(`page error: ${e.message}`));
    page.on('response', async (r) => {
      if (r.request().resourceType() !== 'document') return;
      const h = r.headers();
      out.documents.push({
        method: r.request().method(),
        url: r.url(),
        status: r.status(),
        content_type: h['content-type'] ?? null,
        csp: h['content-security-policy'] ?? null,
        x_frame_options: h['x-frame-options'] ?? null,
        cache_control: h['cache-control'] ?? null,
        x_error: h['x-error'] ?? null,
        x_error_id: h['x-error-id'] ?? null,
      });
    });
    const shot = async (name) => {
      if (!a.shots) return;
      const file = join(a.shots, `${name}.png`);
      await page.screenshot({ path: file, fullPage: true });
      out.screenshots.push(file);
    };
    const base = a.base;
    const org = a.org;

    // ---- sign in: password, then the mailed code ------------------------------------------
    const seen = new Set(mailsTo(a.sink_dir, a.email).map((m) => m.n));
    await page.goto(`${base}/portal`);
    if (!new URL(page.url()).pathname.startsWith('/login')) throw new Error(`not sent to the login: ${page.url()}`);
    await page.getByLabel('Email').fill(a.email);
    await page.getByLabel('Password').fill(a.password);
    await shot('login');
    await Promise.all([page.waitForURL(/\/login\/code/), page.locator('form button[type=submit]').first().click()]);
    const code = await mailedCode(seen);
    await page.locator('input[name=code]').fill(code);
    await Promise.all([page.waitForURL(`${base}/portal`), page.locator('form button[type=submit]').first().click()]);
    await page.getByRole('heading', { name: 'Organisations' }).waitFor();
    step('signed in');
    await shot('dashboard');

    // ---- an application ------------------------------------------------------------------
    await page.locator(`.tile h2 a[href="/portal/orgs/${org}/applications"]`).click();
    await page.getByRole('heading', { name: 'Applications' }).waitFor();
    await shot('applications-empty');
    await page.getByRole('link', { name: 'New application' }).first().click();
    await page.getByLabel('Name').fill('Billing backend');
    // The live check: a malformed id, then a good one.
    await page.getByLabel('Application id').fill('Billing_1');
    await page.locator('#slug-status.check-bad').waitFor();
    out.invalid_slug_message = await page.locator('#slug-status').textContent();
    await page.getByLabel('Application id').fill('billing');
    await page.locator('#slug-status.check-ok').waitFor();
    out.valid_slug_message = await page.locator('#slug-status').textContent();
    out.client_id_preview = await page.locator('#client-id-preview').textContent();
    // The type presets the grants and the method.
    await page.getByLabel('Type').selectOption('spa');
    out.spa_method = await page.locator('#token_endpoint_auth_method').inputValue();
    await page.getByLabel('Type').selectOption('machine');
    out.machine_method = await page.locator('#token_endpoint_auth_method').inputValue();
    await page.locator('input[name=scopes][value="payments/read"]').check();
    await page.locator('input[name=roles][value="payments:reader"]').check();
    await shot('application-new');
    await Promise.all([page.waitForLoadState('load'), page.locator('#create-application').click()]);
    await page.locator('#client-secret').waitFor();
    out.client_id = (await page.locator('#client-id').textContent()).trim();
    out.client_secret = (await page.locator('#client-secret').textContent()).trim();
    out.curl = (await page.locator('#curl-command').textContent()).trim();
    // The copy button puts the secret on the clipboard.
    await page.locator('button[data-copy="client-secret"]').click();
    await page.locator('button[data-copy="client-secret"]', { hasText: 'Copied' }).waitFor();
    out.clipboard = await page.evaluate(() => navigator.clipboard.readText());
    step('application created');
    await shot('application-created');
    await page.getByRole('link', { name: 'Done' }).click();
    await page.locator('#jwks-link').waitFor();
    out.jwks_link = await page.locator('#jwks-link').getAttribute('href');
    out.detail_has_secret = (await page.content()).includes(out.client_secret);
    out.detail_curl = (await page.locator('#curl-command').textContent()).trim();
    await shot('application');

    // ---- the New Certificate wizard --------------------------------------------------------
    await page.getByRole('link', { name: 'New certificate' }).click();
    await page.locator('#choose').waitFor();
    await page.getByLabel('Application', { exact: true }).selectOption('billing');
    await page.locator('input[name=type][value=transport]').check();
    await shot('certificate-choose');
    await Promise.all([page.waitForURL(/certificates\/new\?/), page.locator('#next').click()]);
    const command = (await page.locator('#openssl-command').textContent()).trim();
    out.openssl_command = command;
    if (!command.startsWith('openssl req ')) throw new Error(`not an openssl command: ${command}`);
    // Run the command as a person would paste it into a shell.
    execFileSync('bash', ['-c', command], { cwd: a.work, stdio: ['ignore', 'pipe', 'pipe'] });
    const csrFile = readdirSync(a.work).find((f) => f.endsWith('.csr'));
    if (!csrFile) throw new Error('openssl made no .csr file');
    out.csr_file = join(a.work, csrFile);
    await shot('certificate-wizard');
    await page.locator('#csr_file').setInputFiles(out.csr_file);
    await Promise.all([page.waitForURL(/notice=cert-issued/), page.locator('#issue').click()]);
    out.certificate_url = page.url();
    out.serial = (await page.locator('#serial').textContent()).trim();
    step('certificate issued');
    await shot('certificate');
    for (const [button, file] of [['#download-certificate', 'certificate.pem'], ['#download-chain', 'chain.pem']]) {
      const [dl] = await Promise.all([page.waitForEvent('download'), page.locator(button).click()]);
      const path = join(a.work, `downloaded-${file}`);
      await dl.saveAs(path);
      out[file.replace('.pem', '_file')] = path;
      out[file.replace('.pem', '_name')] = dl.suggestedFilename();
    }
    step('certificate downloaded');

    // ---- revocation ----------------------------------------------------------------------
    await page.locator('#revoke').click();
    await page.getByLabel('Reason').selectOption('key_compromise');
    await shot('certificate-revoke');
    await Promise.all([page.waitForURL(/notice=cert-revoked/), page.locator('#confirm-button').click()]);
    out.revoked_badge = await page.locator('h1 .badge').textContent();
    step('certificate revoked');
    await page.goto(`${base}/portal/orgs/${org}/certificates?status=revoked`);
    out.revoked_listed = (await page.locator('#certificates').textContent()).includes(out.serial);
    await page.goto(`${base}/portal/orgs/${org}/certificates`);
    await shot('certificates');
    await page.goto(`${base}/portal/orgs/${org}/applications`);
    await shot('applications');

    // ---- a user, invited ------------------------------------------------------------------
    await page.goto(`${base}/portal/orgs/${org}/users`);
    await page.getByRole('link', { name: 'Invite user' }).click();
    await page.getByLabel('Email address').fill(a.invitee);
    await page.getByLabel('Name').fill('Invited Person');
    await page.locator('input[name=roles][value="payments:reader"]').check();
    await shot('user-invite');
    await Promise.all([page.waitForURL(/notice=user-invited/), page.locator('#send-invitation').click()]);
    out.invited_badge = await page.locator('h1 .badge').textContent();
    step('user invited');
    await shot('user');
    await page.goto(`${base}/portal/orgs/${org}/users`);
    await shot('users');

    // ---- a service: defined, a permission granted to its role, who holds the role --------
    await page.locator(`nav.subnav a[href="/portal/orgs/${org}/services"]`).click();
    await page.getByRole('heading', { name: 'Services and roles' }).waitFor();
    await page.getByRole('link', { name: 'New service' }).first().click();
    await page.getByLabel('Name', { exact: true }).fill('Ledger');
    await page.getByLabel('Service id', { exact: true }).fill('ledger');
    await page.getByLabel('Audience', { exact: true }).fill('https://ledger.acme.test');
    await page.getByLabel('Scopes', { exact: true }).fill('ledger/read');
    await page.getByLabel('Roles', { exact: true }).fill('ledger:clerk\nledger:auditor');
    await page.getByLabel('Permissions', { exact: true }).fill('ledger.entry.read\nledger.entry.write');
    await shot('service-new');
    await Promise.all([page.waitForURL(/notice=service-created/), page.locator('#create-service').click()]);
    step('service defined');
    await page.locator(`a[href="/portal/orgs/${org}/services/ledger/roles/clerk"]`).click();
    await page.locator('input[name=permissions][value="ledger.entry.read"]').check();
    await Promise.all([page.waitForURL(/notice=role-grants/), page.locator('#save-grants').click()]);
    step('permission granted');
    // The invited person is given the role on their page.
    await page.goto(`${base}/portal/orgs/${org}/users?q=${encodeURIComponent(a.invitee)}`);
    await page.locator('#users a', { hasText: a.invitee }).click();
    await page.locator('input[name=roles][value="ledger:clerk"]').check();
    await Promise.all([page.waitForURL(/notice=user-roles/), page.locator('#roles-form button[type=submit]').click()]);
    await page.goto(`${base}/portal/orgs/${org}/services/ledger/roles/clerk`);
    out.role_users = await page.locator('#role-users').textContent();
    out.role_granted = await page.locator('input[name=permissions][value="ledger.entry.read"]').isChecked();
    await shot('role');
    await page.goto(`${base}/portal/orgs/${org}/services/ledger`);
    out.permission_roles = await page.locator('#permissions').textContent();
    await shot('service');
    await page.goto(`${base}/portal/orgs/${org}/services`);
    await shot('services');
    step('role holders listed');

    // ---- an API key: created, activated with the mailed code, revoked --------------------
    const seenKeyMail = new Set(mailsTo(a.sink_dir, a.email).map((m) => m.n));
    await page.locator('a[href="/portal/api-keys"]').click();
    await page.getByLabel('Name', { exact: true }).fill('ci pipeline');
    await Promise.all([page.waitForLoadState('load'), page.locator('#create-key').click()]);
    await page.locator('#api-secret').waitFor();
    out.api_key = (await page.locator('#api-key').textContent()).trim();
    out.api_secret = (await page.locator('#api-secret').textContent()).trim();
    await shot('api-key-created');
    await page.getByLabel('Code from the email').fill(await mailedCode(seenKeyMail));
    await Promise.all([page.waitForURL(/notice=key-activated/), page.locator('#activate-key').click()]);
    out.key_state_after_activation = await page.locator('#api-keys .badge').first().textContent();
    step('API key activated');
    await shot('api-keys');
    await page.getByRole('link', { name: /^Revoke/ }).first().click();
    await Promise.all([page.waitForURL(/notice=key-revoked/), page.locator('#confirm-button').click()]);
    out.key_state_after_revocation = await page.locator('#api-keys .badge').first().textContent();
    step('API key revoked');

    // ---- the audit log -------------------------------------------------------------------
    await page.goto(`${base}/portal/orgs/${org}/audit?action=certificate.`);
    out.audit_rows = await page.locator('#audit tbody tr').count();
    await page.goto(`${base}/portal/orgs/${org}/audit`);
    out.audit_actor_emails = await page.locator('#audit a.actor').allTextContents();
    await shot('audit');

    // ---- small screens -------------------------------------------------------------------
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}/portal`);
    await shot('dashboard-mobile');
    step('done');
  } finally {
    await browser.close();
  }
}

try {
  await main();
  out.ok = true;
} catch (e) {
  out.ok = false;
  out.error = String(e?.stack ?? e);
}
process.stdout.write(JSON.stringify(out));
