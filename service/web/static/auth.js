// The access token of this tab, for a service that requires one.
//
// It comes from "#token=…" in the page's address (then removed from the address) or from the token
// form, and is kept in sessionStorage: this tab only, gone when the tab closes, and never a cookie,
// so no other site can make the browser send it (no CSRF). Every API request carries it as
// "Authorization: Bearer …". A 401 or 403 opens the token panel with what went wrong.

const STORAGE_KEY = "taskstatus.token";

export function currentToken() {
  try {
    return sessionStorage.getItem(STORAGE_KEY);
  } catch {
    return null; // storage disabled: the page still works where no token is needed
  }
}

export function authHeaders() {
  const token = currentToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function keep(token) {
  try {
    sessionStorage.setItem(STORAGE_KEY, token);
  } catch {
    // storage disabled: the token cannot be kept; requests go without it
  }
}

function forget() {
  try {
    sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    // nothing kept
  }
}

// "#token=…" in the address: keep the token and take it out of the address and of the tab's
// history, so it is not bookmarked, copied along with the link, or left on screen. A fragment
// never reaches a server, so the token is in no server's log either. True if there was one.
export function takeTokenFromAddress() {
  const params = new URLSearchParams(window.location.hash.slice(1));
  if (!params.has("token")) return false;
  const token = params.get("token").trim();
  params.delete("token");
  const rest = params.toString();
  const { pathname, search } = window.location;
  const address = `${pathname}${search}${rest ? `#${rest}` : ""}`;
  window.history.replaceState(window.history.state, "", address);
  if (token) keep(token);
  return true;
}

// What a 401 or 403 means, in words a user can act on.
export function refusalText(status, body) {
  const code = body?.error?.code;
  const message = body?.error?.message ?? `HTTP ${status}`;
  if (status === 401) {
    if (code === "missing_token") return "This service needs an access token.";
    if (code === "token_expired") return "Your access token has expired.";
    return `Your access token was refused: ${message}.`;
  }
  return `Your access token does not allow this: ${message}.`;
}

export function isRefusal(status) {
  return status === 401 || status === 403;
}

// The token panel (under the top bar) and the "token in use" chip (in the top bar).
// onChange(): the token was set or forgotten; the caller starts its requests over.
export class TokenPanel {
  constructor({ onChange }) {
    this.panel = document.getElementById("auth");
    this.message = document.getElementById("auth-message");
    this.form = document.getElementById("token-form");
    this.input = document.getElementById("token-input");
    this.chip = document.getElementById("token-state");
    this.onChange = onChange;

    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      const token = this.input.value.trim();
      if (!token) return;
      keep(token);
      this.form.reset();
      this.hide();
      this.onChange();
    });
    document.getElementById("token-forget").addEventListener("click", () => {
      forget();
      this.hide();
      this.onChange();
    });
    this.#showChip();
  }

  // A 401 or 403: say why, and offer the form. status is kept as data-status for styling/tests.
  showRefusal(status, body) {
    this.panel.dataset.status = String(status);
    this.message.textContent = refusalText(status, body);
    this.panel.hidden = false;
    this.#showChip();
  }

  hide() {
    this.panel.hidden = true;
    delete this.panel.dataset.status;
    this.#showChip();
  }

  // The address brought a new token while the page was open.
  tokenChanged() {
    this.hide();
    this.onChange();
  }

  #showChip() {
    this.chip.hidden = !currentToken();
  }
}
