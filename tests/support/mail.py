"""E-mails for the tests that upload them: text attachments, and attached e-mails that nest."""

from __future__ import annotations

from email.message import EmailMessage


def mail(subject: str, body: str, attachments: list[tuple[str, bytes | EmailMessage]]) -> EmailMessage:
    """An e-mail from ana to ben with this body; each attachment a plain text file, or an attached e-mail."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "ana@example.com", "ben@example.com", subject
    message.set_content(body)
    for name, payload in attachments:
        if isinstance(payload, EmailMessage):
            message.add_attachment(payload, filename=name)
        else:
            message.add_attachment(payload, maintype="text", subtype="plain", filename=name)
    return message
