// Single sign-on with the organisation's identity provider: OAuth 2.0 authorization code with
// PKCE (RFC 7636, S256), as a public client (a browser app keeps no secret). The verifier and
// the state live in this tab's sessionStorage between leaving for the provider and coming back;
// the code is exchanged at the provider's token endpoint and the access token is then used like
// an API key (the API verifies it against the provider's keys). Nothing secret is put in a URL
// but the one-time code, which the page removes from the address bar at once.

const PENDING = "converge.sso";

export async function ssoConfig() {
  try {
    const resp = await fetch("sso.json", { headers: { Accept: "application/json" } });
    return resp.ok ? await resp.json() : { enabled: false };
  } catch {
    return { enabled: false };
  }
}

function base64url(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(bytes = 32) {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

async function discover(issuer) {
  const resp = await fetch(`${issuer}/.well-known/openid-configuration`, { headers: { Accept: "application/json" } });
  if (!resp.ok) throw new Error(`The identity provider's discovery document answered ${resp.status}`);
  const doc = await resp.json();
  if (!doc.authorization_endpoint || !doc.token_endpoint) {
    throw new Error("The identity provider's discovery document names no authorization or token endpoint");
  }
  return doc;
}

function redirectUri() {
  return `${location.origin}${location.pathname}`;
}

// Leave for the provider's sign-in page; it sends the browser back here with ?code=&state=.
export async function beginSignIn(config) {
  const doc = await discover(config.issuer);
  const verifier = randomString(48);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const state = randomString(16);
  sessionStorage.setItem(
    PENDING,
    JSON.stringify({ verifier, state, tokenEndpoint: doc.token_endpoint, clientId: config.client_id, hash: location.hash }),
  );
  const query = new URLSearchParams({
    response_type: "code",
    client_id: config.client_id,
    redirect_uri: redirectUri(),
    scope: config.scope || "openid",
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`${doc.authorization_endpoint}?${query}`);
}

// Back from the provider: the access token, or null when this load is not a sign-in's return.
// Throws with a message a person can act on when the provider refused or the answer is not ours.
export async function completeSignIn() {
  const params = new URLSearchParams(location.search);
  if (!params.has("code") && !params.has("error")) return null;
  const pending = JSON.parse(sessionStorage.getItem(PENDING) || "null");
  sessionStorage.removeItem(PENDING);
  history.replaceState(null, "", `${location.pathname}${pending?.hash || location.hash}`); // the code leaves the address bar
  if (params.has("error")) {
    throw new Error(`Single sign-on failed: ${params.get("error_description") || params.get("error")}`);
  }
  if (!pending || params.get("state") !== pending.state) {
    throw new Error("Single sign-on failed: this answer does not belong to a sign-in started in this tab; sign in again");
  }
  const resp = await fetch(pending.tokenEndpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: redirectUri(),
      client_id: pending.clientId,
      code_verifier: pending.verifier,
    }),
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok || !body.access_token) {
    throw new Error(`Single sign-on failed: the token endpoint answered ${resp.status} ${body.error_description || body.error || ""}`.trim());
  }
  return body.access_token;
}
