"""Sign-in, sign-out, enrollment by invitation (password, authenticator, recovery codes), the
user's own account and the Non-Professional attestation."""
from __future__ import annotations

import io

import segno
from starlette.responses import RedirectResponse

from bondtape.access import accounts, entitlements
from bondtape.access.ca import check_client_certificate, list_certificates
from bondtape.access.model import AccessError
from bondtape.web import sessions
from bondtape.web.routing import Ctx, route
from bondtape.web.tls import client_certificate_der


def home(ctx: Ctx):
    period = ctx.state.policy.at(ctx.now_us)
    return ctx.render("home.html", period=period)


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def login_page(ctx: Ctx):
    period = ctx.state.policy.at(ctx.now_us)
    return ctx.render("login.html", period=period, next=_safe_next(ctx.request.query_params.get("next")), error=None)


def _session_cookie_options(ctx: Ctx) -> dict:
    return dict(httponly=True, secure=ctx.settings.cookie_secure, samesite="strict", path="/",
                max_age=ctx.settings.session_max_hours * 3600)


def login(ctx: Ctx):
    """Password and a second factor. The second factor the policy accepts on this date:
    a TOTP code (or a recovery code) and/or this user's client certificate."""
    period = ctx.state.policy.at(ctx.now_us)
    methods = period.website_methods
    username = ctx.form.get("username", "").strip().lower()
    password = ctx.form.get("password", "")
    code = ctx.form.get("code", "").strip()
    next_path = _safe_next(ctx.form.get("next"))

    def fail(message: str, status: int = 401):
        return ctx.render("login.html", status=status, period=period, next=next_path, error=message)

    lockout = ctx.settings.lockout
    check = accounts.password_step(ctx.conn, username, password, now_us=ctx.now_us, source=ctx.source, lockout=lockout,
                                   action="login")
    if check.user is None:
        if check.reason == "throttled":
            wait = accounts.source_retry_after_s(ctx.conn, ctx.source, now_us=ctx.now_us, lockout=lockout)
            page = fail(f"Too many failed sign-ins from your address: try again in {wait} s.", 429)
            page.headers["Retry-After"] = str(wait)
            return page
        if check.reason == "locked":
            return fail("Too many failed attempts: this user is locked for a while. Contact your administrator.", 423)
        return fail("Sign-in failed: check the user name, password and code.")
    user = check.user
    method = None
    cert = None
    if "certificate" in methods and ctx.state.ca_cert is not None:
        cert = check_client_certificate(ctx.conn, client_certificate_der(ctx.request.scope), ctx.state.ca_cert,
                                        now_us=ctx.now_us)
        if cert.reason == "ok" and cert.user_id == user.id:
            method = "certificate"
            ctx.audit("cert.use", target=f"cert:{cert.serial}", actor=accounts.authenticated(ctx.conn, user.id, "certificate"),
                      detail={"path": "/login"})
    if method is None and "mfa" in methods and code:
        if user.totp_secret and accounts.verify_totp(ctx.conn, ctx.settings.secret_key, user, code, now_us=ctx.now_us):
            method = "mfa"
        elif len(code.replace("-", "").replace(" ", "")) == 12 and accounts.use_recovery_code(ctx.conn, user.id, code,
                                                                                              now_us=ctx.now_us):
            method = "recovery"
    if method is None:
        if "mfa" not in methods:
            reason, message = "certificate_required", ("In this period the website needs your client certificate "
                                                        "(the policy is 'certificate'); a code is not accepted.")
        elif not user.totp_secret:
            reason, message = "mfa_not_enrolled", "You have not enrolled an authenticator: use your enrollment email."
        else:
            reason, message = "bad_second_factor", "Sign-in failed: check the user name, password and code."
        locked = accounts.register_failure(ctx.conn, user, now_us=ctx.now_us, lockout=lockout, source=ctx.source,
                                           action="login.failed", reason=reason)
        if locked:
            return fail("Too many failed attempts: this user is locked for a while. Contact your administrator.", 423)
        return fail(message)
    accounts.register_success(ctx.conn, user.id)
    token, session = sessions.start(ctx.conn, user.id, method=method, now_us=ctx.now_us, settings=ctx.settings,
                                    source=ctx.source)
    actor = accounts.authenticated(ctx.conn, user.id, method)
    ctx.audit("login", actor=actor, detail={"method": method, "policy": period.website})
    response = RedirectResponse(next_path, status_code=303)
    ctx.cookies_to_set.append((sessions.SESSION_COOKIE, token, _session_cookie_options(ctx)))
    return response


def logout(ctx: Ctx):
    sessions.end(ctx.conn, ctx.session, now_us=ctx.now_us)
    ctx.audit("logout")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(sessions.SESSION_COOKIE, path="/")
    return response


# --- enrollment -----------------------------------------------------------------------------


def enroll_page(ctx: Ctx):
    token = ctx.request.path_params["token"]
    _, user = accounts.invitation(ctx.conn, token, now_us=ctx.now_us, source=ctx.source)
    existing = user.status == "ACTIVE" and bool(user.password_hash)
    return ctx.render("enroll.html", token=token, user=user, existing=existing, error=None)


def enroll_password(ctx: Ctx):
    token = ctx.request.path_params["token"]
    password = ctx.form.get("password", "")
    _, user = accounts.invitation(ctx.conn, token, now_us=ctx.now_us, source=ctx.source)
    existing = user.status == "ACTIVE" and bool(user.password_hash)
    if not existing and password != ctx.form.get("password2", ""):
        return ctx.render("enroll.html", status=400, token=token, user=user, existing=existing,
                          error="The two passwords differ.")
    accounts.begin_enrollment(ctx.conn, ctx.settings.secret_key, token, password, now_us=ctx.now_us,
                              source=ctx.source, lockout=ctx.settings.lockout)
    return RedirectResponse(f"/enroll/{token}/authenticator", status_code=303)


def _qr_svg(uri: str) -> str:
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=5, xmldecl=False, svgns=True)
    import base64

    return "data:image/svg+xml;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def enroll_authenticator(ctx: Ctx):
    token = ctx.request.path_params["token"]
    username, secret = accounts.pending_secret(ctx.conn, ctx.settings.secret_key, token, now_us=ctx.now_us)
    import pyotp

    uri = pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=ctx.settings.totp_issuer)
    grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))
    return ctx.render("enroll_authenticator.html", token=token, qr=_qr_svg(uri), secret=grouped, error=None)


def enroll_confirm(ctx: Ctx):
    token = ctx.request.path_params["token"]
    user_id, codes = accounts.complete_enrollment(ctx.conn, ctx.settings.secret_key, token, ctx.form.get("code", ""),
                                                  now_us=ctx.now_us, source=ctx.source, lockout=ctx.settings.lockout)
    return ctx.render("recovery_codes.html", codes=codes, enrolled=True)


# --- the user's account -------------------------------------------------------------------


def account(ctx: Ctx):
    user = accounts.user_by_id(ctx.conn, ctx.actor.user_id)
    org = accounts.organisation(ctx.conn, ctx.actor.org_id)
    return ctx.render(
        "account.html", user=user, org=org, codes_left=accounts.recovery_codes_left(ctx.conn, user.id),
        certificates=list_certificates(ctx.conn, user.id), grants=entitlements.list_for(ctx.conn, org.id),
        attested=entitlements.has_attested(ctx.conn, user.id), error=None)


def regenerate_codes(ctx: Ctx):
    user = accounts.user_by_id(ctx.conn, ctx.actor.user_id)
    if not accounts.verify_totp(ctx.conn, ctx.settings.secret_key, user, ctx.form.get("code", ""), now_us=ctx.now_us):
        accounts.register_failure(ctx.conn, user, now_us=ctx.now_us, lockout=ctx.settings.lockout, source=ctx.source,
                                  action="mfa.recovery.failed", reason="bad_totp")
        raise AccessError("TOTP_WRONG", "enter a current code from your authenticator to make new recovery codes", "code")
    codes = accounts.new_recovery_codes(ctx.conn, user.id, now_us=ctx.now_us)
    ctx.audit("mfa.recovery.regenerate")
    return ctx.render("recovery_codes.html", codes=codes, enrolled=False)


def attest_page(ctx: Ctx):
    return ctx.render("attest.html", statements=entitlements.NON_PROFESSIONAL_STATEMENTS,
                      attested=entitlements.has_attested(ctx.conn, ctx.actor.user_id), error=None)


def attest(ctx: Ctx):
    answers = {k: ctx.form.get(k) == "yes" for k in entitlements.NON_PROFESSIONAL_STATEMENTS}
    entitlements.attest_non_professional(ctx.conn, ctx.actor, answers, ctx.form.get("signed_name", ""),
                                         at_us=ctx.now_us, source=ctx.source)
    return RedirectResponse("/account", status_code=303)


ROUTES = [
    route("/", home, rule="public"),
    route("/login", login_page, rule="public"),
    route("/login", login, rule="public", methods=["POST"], name="login_submit"),
    route("/logout", logout, rule="account", methods=["POST"]),
    route("/enroll/{token}", enroll_page, rule="public"),
    route("/enroll/{token}", enroll_password, rule="public", methods=["POST"], name="enroll_password"),
    route("/enroll/{token}/authenticator", enroll_authenticator, rule="public"),
    route("/enroll/{token}/confirm", enroll_confirm, rule="public", methods=["POST"]),
    route("/account", account, rule="account"),
    route("/account/recovery-codes", regenerate_codes, rule="account", methods=["POST"]),
    route("/account/attest", attest_page, rule="account"),
    route("/account/attest", attest, rule="account", methods=["POST"], name="attest_submit"),
]
