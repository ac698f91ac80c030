"""The book's notification function, as functions-framework runs it: the baseline of `make bench`.

A Cloud Storage event arrives as a CloudEvent; the function builds one email with the `sendgrid`
package and sends it synchronously, one blocking HTTPS call per event, exactly as the book does.
No deduplication, no retry policy of its own: a failure is an exception, which functions-framework
answers with 500 so Eventarc redelivers.

Started the way Cloud Run's buildpack starts it:
    functions-framework --source main.py --target notify --signature-type cloudevent

Environment: SENDGRID_API_KEY, NOTIFY_TO (comma-separated), NOTIFY_FROM, and SENDGRID_HOST (the
bench points it at its fake SendGrid; the client's default is https://api.sendgrid.com).
"""

import os

import functions_framework
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Mail

HEADLINES = {
    "google.cloud.storage.object.v1.finalized": "uploaded",
    "google.cloud.storage.object.v1.deleted": "deleted",
    "google.cloud.storage.object.v1.archived": "archived",
    "google.cloud.storage.object.v1.metadataUpdated": "metadata updated",
}


@functions_framework.cloud_event
def notify(cloud_event):
    data = cloud_event.data
    what = HEADLINES.get(cloud_event["type"], cloud_event["type"])
    bucket, name = data["bucket"], data["name"]
    text = (
        f"gs://{bucket}/{name} was {what}.\n"
        f"Size: {data.get('size')} bytes\n"
        f"Content type: {data.get('contentType')}\n"
        f"Generation: {data.get('generation')}\n"
        f"Updated: {data.get('updated')}\n"
        f"Event ID: {cloud_event['id']}\n"
    )
    html = (
        f"<p><b>gs://{bucket}/{name}</b> was {what}.</p><ul>"
        f"<li>Size: {data.get('size')} bytes</li>"
        f"<li>Content type: {data.get('contentType')}</li>"
        f"<li>Generation: {data.get('generation')}</li>"
        f"<li>Updated: {data.get('updated')}</li>"
        f"<li>Event ID: {cloud_event['id']}</li></ul>"
    )
    message = Mail(
        from_email=os.environ["NOTIFY_FROM"],
        to_emails=os.environ["NOTIFY_TO"].split(","),
        subject=f"[gs://{bucket}] {what}: {name}",
        plain_text_content=text,
        html_content=html,
        is_multiple=True,  # one personalization per recipient, as the service sends
    )
    client = SendGridAPIClient(
        api_key=os.environ["SENDGRID_API_KEY"],
        host=os.environ.get("SENDGRID_HOST", "https://api.sendgrid.com"),
    )
    client.send(message)  # raises on 4xx/5xx: the event is answered 500 and redelivered
