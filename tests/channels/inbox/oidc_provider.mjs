// A real OpenID Connect provider for the single sign-on stories: node-oidc-provider with its development
// interactions (a login form taking any login name, then a consent page), on 127.0.0.1.
// Usage: node oidc_provider.mjs MODULES PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI ACCOUNTS_JSON
//   MODULES: the node_modules holding oidc-provider (scripts/test-deps installs it in .test-deps/oidc)
//   ACCOUNTS_JSON: {"<login>": {"email": "...", "email_verified": true}}; an unknown login has no email.
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [modules, port, clientId, clientSecret, redirectUri, accountsJson] = process.argv.slice(2);
const { default: Provider } = await import(pathToFileURL(join(modules, 'oidc-provider/lib/index.js')).href);
const accounts = JSON.parse(accountsJson);

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    post_logout_redirect_uris: [new URL('/login', redirectUri).href],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }, {
    client_id: 'another-client',
    client_secret: 'another-secret',
    redirect_uris: [redirectUri],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  pkce: { required: () => true },
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['keyturn-test-cookie-key'] },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        const a = accounts[id] || {};
        return { sub: id, ...(a.email ? { email: a.email, email_verified: a.email_verified !== false } : {}) };
      },
    };
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.listen(Number(port), '127.0.0.1', () => console.log('ready'));
