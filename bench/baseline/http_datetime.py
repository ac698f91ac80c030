"""The book's HTTP function: greet the requester with today's date and the time.

Its own source file, as its own deployment has: a separate function does not import `sendgrid`
(about 0.15 s on the bench machine), so its cold start is functions-framework's own.

    functions-framework --source http_datetime.py --target get_datetime --signature-type http
"""

from datetime import UTC, datetime


def get_datetime(request):
    requester = request.args.get("requester", "anonymous")
    now = datetime.now(UTC)
    return f"Hello {requester}! Today is {now:%A, %d %B %Y} and the time is {now:%H:%M:%S} UTC.\n"
