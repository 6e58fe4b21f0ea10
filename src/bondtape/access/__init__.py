"""Access: organisations, users, MFA, invitations, certificates, entitlements, audit."""
