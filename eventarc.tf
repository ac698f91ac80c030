# Cloud Storage -> Eventarc -> Cloud Run -> email (README, "Deploy").
#
# Terraform owns the project wiring: APIs, two service accounts, IAM grants, the Firestore database
# that keeps the service's state (README, "Stores: where state lives"), the Cloud Run service,
# and how the bucket's changes reach it (var.delivery): one Eventarc trigger per Cloud Storage event
# type with an alert on each trigger's undelivered events, or the bucket's own Pub/Sub notification
# config, a push subscription with a dead-letter topic, and one alert on both. Cloud Build
# (cloudbuild.yaml) owns the image: every `gcloud builds submit` deploys a new revision of this
# same service, so Terraform ignores what `gcloud run deploy` changes (see `lifecycle` below).
#
# Order (README): `terraform apply` creates the service without triggers, Cloud Build deploys the
# real image, then `terraform apply -var create_triggers=true` connects the bucket (triggers, or
# notification config and push subscription). Until then the service runs a placeholder image that
# would acknowledge any event without sending an email.
#
# Offline checks: tests/deploy/test_terraform.py (structure, via python-hcl2) and checkov
# (.ci/check_deploy.sh). Argument names follow the hashicorp/google provider documentation.

terraform {
  required_version = ">= 1.5"

  # 7.x: the service-level `scaling { max_instance_count }` below. .terraform.lock.hcl pins the
  # exact release and its checksums (tests/deploy/test_terraform.py keeps the two agreeing).
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 7.12"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

variable "project" {
  description = "Google Cloud project ID."
  type        = string
}

variable "region" {
  description = "Region of the Cloud Run service (the triggers live in the bucket's location)."
  type        = string
  default     = "us-central1"
}

variable "bucket" {
  description = "Name of the existing Cloud Storage bucket to watch."
  type        = string
}

variable "image" {
  description = "Image of the first revision. Later revisions come from cloudbuild.yaml. The default is Google's sample that answers on $PORT, so the service can exist before the first build; it acknowledges any event without emailing, which is why no trigger exists until create_triggers = true."
  type        = string
  default     = "us-docker.pkg.dev/cloudrun/container/hello"
}

variable "create_triggers" {
  description = "Connect the bucket to the service: the Eventarc triggers, or with delivery = \"pubsub\" the notification config and the push subscription. Set to true only once Cloud Build has deployed the real image (README order: apply, build, apply with true), and keep it true (terraform.tfvars): false deletes them."
  type        = bool
  default     = false
}

variable "delivery" {
  description = "How the bucket's changes reach the service. \"eventarc\": one Eventarc trigger per event type. \"pubsub\": a Cloud Storage notification config on the bucket publishes to a topic, and a push subscription posts each message to the service with the trigger account's token, dead-lettering it after 10 failed attempts. Choose pubsub to filter object names at the source (object_name_prefix) or to manage the delivery like the bucket's other notification configs."
  type        = string
  default     = "eventarc"

  validation {
    condition     = contains(["eventarc", "pubsub"], var.delivery)
    error_message = "delivery must be \"eventarc\" (Eventarc triggers) or \"pubsub\" (a Cloud Storage notification config and a push subscription)."
  }
}

variable "object_name_prefix" {
  description = "With delivery = \"pubsub\": notify only about objects whose names begin with this (the notification config's object_name_prefix; Cloud Storage filters before publishing). Empty: every object. Eventarc has no such filter at the source; there, route by name in the rules file."
  type        = string
  default     = ""
}

variable "service" {
  description = "Name of the Cloud Run service; also prefixes the service accounts and triggers."
  type        = string
  default     = "gcs-notifier"

  validation {
    # Service account IDs are 6-30 characters; the longest one made from this is SERVICE-trigger.
    condition     = can(regex("^[a-z][a-z0-9-]{4,21}$", var.service))
    error_message = "service must be 5-22 characters: lowercase letters, digits and hyphens."
  }
}

variable "notify_to" {
  description = "Recipients of the notifications."
  type        = list(string)

  validation {
    condition     = length(var.notify_to) > 0
    error_message = "notify_to needs at least one address."
  }
}

variable "notify_from" {
  description = "Sender address, verified in SendGrid (Sender Authentication)."
  type        = string
}

variable "sendgrid_secret" {
  description = "ID of the Secret Manager secret that holds the SendGrid API key."
  type        = string
  default     = "sendgrid-api-key"
}

variable "sendgrid_secret_version" {
  description = "Version number of that secret to mount (`gcloud secrets versions list`). Pinned, never latest: a revision keeps the key it started with, and a rotation is a new version plus a deploy (README, \"Rotating the SendGrid key\"). Use the same number as _SENDGRID_SECRET_VERSION in Cloud Build."
  type        = string

  validation {
    condition     = can(regex("^[1-9][0-9]*$", var.sendgrid_secret_version))
    error_message = "sendgrid_secret_version must be a version number such as 3, not latest: with latest, instances started after a rotation use the new key while warm ones keep the old."
  }
}

variable "rules_secret" {
  description = "ID of the Secret Manager secret holding the routing rules file (README, \"Routing rules on Cloud Run\"), mounted as /etc/gcs-notifier/rules.yaml and named by NOTIFY_RULES. Empty: no rules file, every event goes to notify_to. Use the same as _RULES_SECRET in Cloud Build."
  type        = string
  default     = ""

  validation {
    condition     = var.rules_secret == "" || can(regex("^[A-Za-z0-9_-]{1,255}$", var.rules_secret))
    error_message = "rules_secret must be a secret ID (letters, digits, hyphens and underscores), or empty for no rules file."
  }
}

variable "rules_secret_version" {
  description = "Version number of rules_secret to mount, required with it (`gcloud secrets versions list`). Pinned, never latest: the service reads the file once at start-up, so with latest, instances started after an upload would route by the new file while warm ones kept the old; with a number, a new file is a new version plus a deploy, and a bad file stops only the new revision while the old one keeps serving. Use the same number as _RULES_SECRET_VERSION in Cloud Build."
  type        = string
  default     = ""

  validation {
    condition     = var.rules_secret_version == "" || can(regex("^[1-9][0-9]*$", var.rules_secret_version))
    error_message = "rules_secret_version must be a version number such as 2, not latest: with latest, instances started after an upload would route by the new file while warm ones kept the old."
  }
}

variable "public_datetime" {
  description = "Let anyone call the service (GET /datetime, like the book's public HTTP function). Events stay protected: the service checks the trigger's OIDC token itself (EVENT_AUTH=oidc). false: only IAM invokers reach it, Cloud Run checks the token and removes its signature, and the service runs with EVENT_AUTH=iam. Keep it equal to _PUBLIC in Cloud Build."
  type        = bool
  default     = true
}

variable "cloud_build_service_account" {
  description = "Email of the service account Cloud Build deploys with (`gcloud builds get-default-service-account`). Gets roles/run.admin on this service only and roles/iam.serviceAccountUser on the runtime account only. Empty: grant nothing."
  type        = string
  default     = ""

  validation {
    condition     = var.cloud_build_service_account == "" || can(regex("^[^@[:space:]]+@[^@[:space:]]+\\.gserviceaccount\\.com$", var.cloud_build_service_account))
    error_message = "cloud_build_service_account must be a service account email (NAME@PROJECT.iam.gserviceaccount.com), or empty."
  }
}

variable "alert_after_seconds" {
  description = "Alert when a trigger's oldest undelivered event is older than this. Eventarc drops an event 24 hours after it was published; the default leaves 23 hours to fix SendGrid, the key or the service."
  type        = number
  default     = 3600

  validation {
    condition     = var.alert_after_seconds >= 300 && var.alert_after_seconds <= 43200
    error_message = "alert_after_seconds must be between 300 (5 minutes: retries of a passing hiccup) and 43200 (12 hours, half of Eventarc's 24)."
  }
}

variable "alert_notification_channels" {
  description = "Cloud Monitoring notification channel IDs (projects/PROJECT/notificationChannels/ID) the undelivered-events alerts go to. Empty: the incidents show in Cloud Monitoring only."
  type        = list(string)
  default     = []
}

variable "digest_schedule" {
  description = "How often Cloud Scheduler calls POST /digests/flush, in unix-cron format (minute hour day-of-month month day-of-week, UTC). On Cloud Run the CPU is throttled between requests, so the service's own flush timer cannot be relied on: this job is what sends a digest route's windows when they close. Empty: no job (for a rules file without digest routes)."
  type        = string
  default     = "* * * * *"

  validation {
    condition     = var.digest_schedule == "" || can(regex("^[^ ]+( [^ ]+){4}$", var.digest_schedule))
    error_message = "digest_schedule must be five cron fields separated by single spaces, such as \"* * * * *\" (every minute) or \"*/5 * * * *\", or empty for no job."
  }
}

variable "deletion_protection" {
  description = "Refuse `terraform destroy` of the Cloud Run service (the provider's default is true)."
  type        = bool
  default     = true
}

variable "firestore_database" {
  description = "ID of the Firestore database (Native mode, in var.region) this configuration creates for the service's done marks, claims and digest windows. A database of its own, so a project's (default) database is left alone."
  type        = string
  default     = "gcs-notifier"

  validation {
    # Firestore database IDs: 4-63 characters, lowercase letters, digits and hyphens, starting
    # with a letter and ending with a letter or digit; "(default)" is the project's own.
    condition     = can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore_database))
    error_message = "firestore_database must be 4-63 characters: lowercase letters, digits and hyphens, starting with a letter and ending with a letter or digit (not \"(default)\": that database is the project's own)."
  }
}

variable "store_prefix" {
  description = "Start of the names of the Firestore collections the service uses (the prefix parameter of IDEMPOTENCY_STORE): PREFIX-claims, PREFIX-digest-windows, ... Two services sharing one database need different prefixes."
  type        = string
  default     = "gcs-notifier"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,39}$", var.store_prefix))
    error_message = "store_prefix must be 1-40 characters: lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "idempotency_store" {
  description = "IDEMPOTENCY_STORE of the service. Empty (the default): the Firestore database above, firestore://PROJECT/firestore_database?prefix=store_prefix. A sqlite:///PATH store keeps its state in the instance's memory and caps the service at one instance. redis_url, when set, wins over both."
  type        = string
  default     = ""

  validation {
    condition     = var.idempotency_store == "" || can(regex("^(sqlite:///|firestore://)", var.idempotency_store))
    error_message = "idempotency_store must be empty (the Firestore database this configuration creates), a firestore:// URL or a sqlite:/// path; for Redis set redis_url."
  }
}

variable "redis_url" {
  description = "redis://HOST:PORT/DB of a Memorystore instance, which then holds the service's state instead of Firestore (the service also needs VPC access: vpc_network, vpc_subnetwork). Empty: no Redis."
  type        = string
  default     = ""
  sensitive   = true
}

variable "max_instances" {
  description = "Maximum instances, service-wide and per revision, with a shared store (Firestore, the default, or Redis). A sqlite:/// idempotency_store runs one instance whatever this says."
  type        = number
  default     = 10

  validation {
    condition     = var.max_instances >= 1
    error_message = "max_instances must be at least 1."
  }
}

variable "vpc_network" {
  description = "VPC network for direct VPC egress to Memorystore (empty: no VPC access)."
  type        = string
  default     = ""
}

variable "vpc_subnetwork" {
  description = "Subnetwork for direct VPC egress to Memorystore."
  type        = string
  default     = ""
}

locals {
  # The four Cloud Storage event types Eventarc delivers, keyed by a name usable in trigger IDs
  # (lowercase letters, digits and hyphens).
  event_types = {
    "finalized"        = "google.cloud.storage.object.v1.finalized"
    "deleted"          = "google.cloud.storage.object.v1.deleted"
    "archived"         = "google.cloud.storage.object.v1.archived"
    "metadata-updated" = "google.cloud.storage.object.v1.metadataUpdated"
  }

  # Where the service keeps its done marks, claims and digest windows (README, "Stores: where state
  # lives"): Redis when redis_url is set, else idempotency_store when set, else the Firestore
  # database below, shared by every instance and kept across deploys and scale to zero. Naming
  # the database resource also makes the service wait for it.
  firestore_url     = "firestore://${var.project}/${google_firestore_database.store.name}?prefix=${var.store_prefix}"
  idempotency_store = coalesce(var.redis_url, var.idempotency_store, local.firestore_url)

  # The filesystem of a Cloud Run instance is its own: a SQLite store deduplicates only within
  # one instance, so with one the service is capped at one instance (80 concurrent requests).
  per_instance_store = var.redis_url == "" && startswith(var.idempotency_store, "sqlite:")
  max_instance_count = local.per_instance_store ? 1 : var.max_instances

  # A digest window's events are spread over this many collection groups under it, one per shard
  # (app/stores/firestore.py, DIGEST_EVENT_SHARDS; app/stores/firestore_windows.py says why).
  digest_event_shards = 8
  digest_event_collections = [
    for shard in range(local.digest_event_shards) : "${var.store_prefix}-digest-events-${shard}"
  ]

  # The collections whose documents carry `expire_at` (app/stores/firestore.py,
  # expiring_collections): claims and done marks, a change's dedup record, done digest windows,
  # their events (in the shards, and under windows of the layout before shards in
  # PREFIX-digest-events), rate-limit periods. Firestore's TTL policy deletes each document some
  # time after it expires.
  ttl_collections = toset(concat([
    "${var.store_prefix}-claims",
    "${var.store_prefix}-digest-changes",
    "${var.store_prefix}-digest-windows",
    "${var.store_prefix}-digest-events",
    "${var.store_prefix}-digest-rates",
  ], local.digest_event_collections))

  # Fields of the stores' documents that no query reads, by collection group, exempt from
  # indexing (app/stores/firestore_claims.py, firestore_windows.py). Claims and changes are written
  # once per email and per event (thousands a second in a bulk upload); `token`, `lease_until` and
  # a period's `end` grow with time, and an indexed field that grows with time caps the writes to
  # a collection at 500 a second (Firestore docs, "Best practices", "Index exemptions"). An event's
  # `item` and a window's `summary` are long values nothing filters on. `expire_at` is exempt with
  # its TTL policy, and the events' other fields stay indexed: a digest's summary queries them.
  unindexed_fields = merge({
    "${var.store_prefix}-claims"         = ["state", "token", "lease_until"]
    "${var.store_prefix}-digest-changes" = ["window", "route", "shards", "end"]
    "${var.store_prefix}-digest-events"  = ["item"]
    "${var.store_prefix}-digest-windows" = ["summary"]
  }, { for events in local.digest_event_collections : events => ["item"] })

  # The rules file: one secret version mounted as one file in a folder of its own (Cloud Run
  # mounts one secret per folder and hides what the image had there). cloudbuild.yaml mounts the
  # same path. Empty list: no volume, no mount, no NOTIFY_RULES, no grant.
  rules_folder = "/etc/gcs-notifier"
  rules_file   = "rules.yaml"
  rules        = var.rules_secret == "" ? [] : [var.rules_secret]

  # The service's deterministic URL (Cloud Run docs, "Deterministic URL"): the audience of the
  # trigger's token. The service cannot read its own `uri` in its environment (a cycle), and the
  # Host header is the caller's to choose, so the URL is built from what it is made of.
  event_audience = "https://${var.service}-${data.google_project.this.number}.${var.region}.run.app"

  # var.delivery: which path exists. Either one connects the bucket only with create_triggers.
  eventarc = var.delivery == "eventarc"
  pubsub   = var.delivery == "pubsub"

  # The same four changes as Cloud Storage names them in a notification config (JSON API).
  notification_event_types = [
    "OBJECT_FINALIZE",
    "OBJECT_DELETE",
    "OBJECT_ARCHIVE",
    "OBJECT_METADATA_UPDATE",
  ]

  # Google creates the Pub/Sub service agent when the API is enabled. It mints the push
  # subscription's tokens and forwards undeliverable messages to the dead-letter topic.
  pubsub_service_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # Eventarc's subscription name is projects/PROJECT/subscriptions/ID; Monitoring labels it by ID.
  subscription_ids = {
    for key, trigger in google_eventarc_trigger.storage :
    key => element(split("/", trigger.transport[0].pubsub[0].subscription), 3)
  }

  apis = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudscheduler.googleapis.com",
    "eventarc.googleapis.com",
    "firestore.googleapis.com",
    "iam.googleapis.com",
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
  ])
}

# ---------------------------------------------------------------------------------------------
# APIs and identities
# ---------------------------------------------------------------------------------------------

resource "google_project_service" "apis" {
  for_each = local.apis

  project            = var.project
  service            = each.key
  disable_on_destroy = false # other workloads in the project may use the same APIs
}

data "google_project" "this" {
  project_id = var.project
}

data "google_storage_bucket" "watched" {
  name = var.bucket
}

# The Cloud Storage service agent publishes the bucket's changes to Eventarc's Pub/Sub topics.
data "google_storage_project_service_account" "gcs" {
  project = var.project

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "runtime" {
  account_id   = "${var.service}-run"
  display_name = "${var.service} Cloud Run service"

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "trigger" {
  account_id   = "${var.service}-trigger"
  display_name = "${var.service} Eventarc triggers (invokes the service)"

  depends_on = [google_project_service.apis]
}

# ---------------------------------------------------------------------------------------------
# IAM
# ---------------------------------------------------------------------------------------------

resource "google_secret_manager_secret_iam_member" "runtime_reads_sendgrid_key" {
  project   = var.project
  secret_id = var.sendgrid_secret
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.runtime.email}"
}

resource "google_secret_manager_secret_iam_member" "runtime_reads_rules" {
  count = var.rules_secret == "" ? 0 : 1

  project   = var.project
  secret_id = var.rules_secret
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.runtime.email}"
}

# Eventarc only: the triggers deliver as the trigger account, and the storage service agent
# publishes into the topics Eventarc creates. With delivery = "pubsub" the agent may publish to this
# configuration's topic only (google_pubsub_topic_iam_member.gcs_publishes_notifications).
resource "google_project_iam_member" "trigger_receives_events" {
  count = local.eventarc ? 1 : 0

  project = var.project
  role    = "roles/eventarc.eventReceiver"
  member  = "serviceAccount:${google_service_account.trigger.email}"
}

resource "google_project_iam_member" "gcs_publishes_events" {
  count = local.eventarc ? 1 : 0

  project = var.project
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# Both paths end in a Pub/Sub push with the trigger account's OIDC token (Eventarc's own
# subscriptions, or this configuration's). Eventarc and Pub/Sub docs: a Pub/Sub service agent
# created on or before 8 April 2021 (without roles/pubsub.serviceAgent) needs the right to mint
# those tokens; granted on the trigger account only, not project-wide; harmless where not needed.
resource "google_service_account_iam_member" "pubsub_signs_for_trigger" {
  service_account_id = google_service_account.trigger.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent
}

# The two grants became conditional (delivery); their state moves rather than being re-created.
moved {
  from = google_project_iam_member.trigger_receives_events
  to   = google_project_iam_member.trigger_receives_events[0]
}

moved {
  from = google_project_iam_member.gcs_publishes_events
  to   = google_project_iam_member.gcs_publishes_events[0]
}

# Cloud Build deploys with `gcloud run deploy`: it acts as the runtime account (this account
# only, not every account of the project) and administers this service only. run.admin rather than
# run.developer because each deploy also sets who may invoke (--[no-]allow-unauthenticated), which
# needs run.services.setIamPolicy; without it gcloud only warns, and the access would stop
# matching EVENT_AUTH.
resource "google_service_account_iam_member" "cloud_build_acts_as_runtime" {
  count = var.cloud_build_service_account == "" ? 0 : 1

  service_account_id = google_service_account.runtime.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${var.cloud_build_service_account}"
}

resource "google_cloud_run_v2_service_iam_member" "cloud_build_deploys" {
  count = var.cloud_build_service_account == "" ? 0 : 1

  project  = var.project
  location = google_cloud_run_v2_service.notifier.location
  name     = google_cloud_run_v2_service.notifier.name
  role     = "roles/run.admin"
  member   = "serviceAccount:${var.cloud_build_service_account}"
}

resource "google_cloud_run_v2_service_iam_member" "trigger_invokes" {
  project  = var.project
  location = google_cloud_run_v2_service.notifier.location
  name     = google_cloud_run_v2_service.notifier.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.trigger.email}"
}

# Public on purpose, and only when var.public_datetime: GET /datetime answers anyone, like the book's
# public HTTP function, while POST / still demands the trigger's OIDC token (EVENT_AUTH=oidc).
# The same variable picks EVENT_AUTH below: on a private service Cloud Run's IAM has already
# verified the token and forwards it with the signature removed (EVENT_AUTH=iam).
resource "google_cloud_run_v2_service_iam_member" "public_datetime" {
  count = var.public_datetime ? 1 : 0

  project  = var.project
  location = google_cloud_run_v2_service.notifier.location
  name     = google_cloud_run_v2_service.notifier.name
  role     = "roles/run.invoker"
  member   = "allUsers"
}

# ---------------------------------------------------------------------------------------------
# State (README, "Stores: where state lives"): a Firestore database of the service's own, in Native
# mode and in the service's region, holds the done marks, claims and digest windows, so they are
# shared by every instance and survive deploys and scale to zero. A named database, not the
# project's (default) one, which other workloads may use. Created before the service, which
# names it in IDEMPOTENCY_STORE.
# ---------------------------------------------------------------------------------------------

resource "google_firestore_database" "store" {
  project     = var.project
  name        = var.firestore_database
  location_id = var.region
  type        = "FIRESTORE_NATIVE"

  # The stores take no locks: a claim is a create(), and every later write is conditional on the
  # document's update time, checked when it commits. OPTIMISTIC says the same of any transaction.
  concurrency_mode            = "OPTIMISTIC"
  app_engine_integration_mode = "DISABLED"

  # `terraform destroy` deletes the database with everything in it, and only once
  # deletion_protection is false, the same switch as for the service. (The provider's default,
  # ABANDON, would leave the database behind, and its name taken, after a destroy.)
  deletion_policy         = "DELETE"
  delete_protection_state = var.deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"

  depends_on = [google_project_service.apis]
}

# A TTL policy on `expire_at` in each collection group whose documents carry it: Firestore deletes
# a document after the time it holds (typically within a day, Firestore docs, "Manage data
# retention with TTL policies"), so done marks, abandoned claims and sent digests do not stay
# forever. `index_config {}` drops the field's single-field indexes: no query filters on it, and
# an index on an ever-increasing timestamp would only add write cost.
resource "google_firestore_field" "expire_at" {
  for_each = local.ttl_collections

  project    = var.project
  database   = google_firestore_database.store.name
  collection = each.key
  field      = "expire_at"

  ttl_config {}
  index_config {}
}

# The fields above that no query reads: an empty index_config drops their single-field indexes.
resource "google_firestore_field" "unindexed" {
  for_each = {
    for exempt in flatten([
      for collection, fields in local.unindexed_fields : [
        for field in fields : { collection = collection, field = field }
      ]
    ]) : "${exempt.collection}/${exempt.field}" => exempt
  }

  project    = var.project
  database   = google_firestore_database.store.name
  collection = each.value.collection
  field      = each.value.field

  index_config {}
}

# Read and write documents (roles/datastore.user), in this database only: the IAM condition
# (Firestore docs, "Configure per-database access permissions") keeps the runtime account out of
# the project's other databases.
resource "google_project_iam_member" "runtime_uses_store" {
  project = var.project
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.runtime.email}"

  condition {
    title       = "${var.service} store only"
    description = "Documents of the ${google_firestore_database.store.name} Firestore database"
    expression  = "resource.name == \"${google_firestore_database.store.id}\""
  }
}

# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------

resource "google_cloud_run_v2_service" "notifier" {
  name                = var.service
  location            = var.region
  deletion_protection = var.deletion_protection
  ingress             = "INGRESS_TRAFFIC_ALL"

  # The instance cap, for the whole service: max_instances with a shared store (Firestore or
  # Redis), one with SQLite. Cloud Run applies the service level at once and across revisions,
  # while a revision's own cap (template.scaling) may briefly be exceeded (Cloud Run docs, "Set
  # maximum instances"). Cloud Build sets both (--max, --max-instances).
  scaling {
    max_instance_count = local.max_instance_count
  }

  template {
    service_account                  = google_service_account.runtime.email
    max_instance_request_concurrency = 80
    timeout                          = "60s"

    scaling {
      min_instance_count = 0
      max_instance_count = local.max_instance_count
    }

    dynamic "vpc_access" {
      for_each = var.vpc_subnetwork == "" ? [] : [var.vpc_subnetwork]
      content {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = var.vpc_network
          subnetwork = vpc_access.value
        }
      }
    }

    dynamic "volumes" {
      for_each = local.rules
      content {
        name = "rules"
        secret {
          secret = var.rules_secret
          items {
            version = var.rules_secret_version
            path    = local.rules_file
          }
        }
      }
    }

    containers {
      image = var.image

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu    = "1"
          memory = "512Mi"
        }
        # CPU only while a request is served (request-based billing), as `gcloud run deploy`
        # does by default: with `resources` set, the provider would otherwise keep CPU always
        # allocated and bill every instance-second.
        cpu_idle = true
        # Full CPU for the start-up after a scale from zero, when a burst of redeliveries waits.
        startup_cpu_boost = true
      }

      env {
        name  = "NOTIFIER"
        value = "sendgrid"
      }
      env {
        name  = "NOTIFY_TO"
        value = join(",", var.notify_to)
      }
      env {
        name  = "NOTIFY_FROM"
        value = var.notify_from
      }
      env {
        name = "SENDGRID_API_KEY"
        value_source {
          secret_key_ref {
            secret  = var.sendgrid_secret
            version = var.sendgrid_secret_version
          }
        }
      }
      env {
        name  = "EVENT_AUTH"
        value = var.public_datetime ? "oidc" : "iam"
      }
      env {
        name  = "EVENT_AUDIENCE"
        value = local.event_audience
      }
      env {
        name  = "EVENT_INVOKERS"
        value = google_service_account.trigger.email
      }
      env {
        name  = "IDEMPOTENCY_STORE"
        value = local.idempotency_store
      }
      env {
        name  = "GOOGLE_CLOUD_PROJECT"
        value = var.project
      }
      # CPU only during requests (cpu_idle above): a flush of the service's own timer would be
      # frozen between requests and wake with its claims lost. Cloud Scheduler keeps time.
      env {
        name  = "DIGEST_FLUSH_SECONDS"
        value = "0"
      }
      dynamic "env" {
        for_each = local.rules
        content {
          name  = "NOTIFY_RULES"
          value = "${local.rules_folder}/${local.rules_file}"
        }
      }

      dynamic "volume_mounts" {
        for_each = local.rules
        content {
          name       = "rules"
          mount_path = local.rules_folder
        }
      }

      startup_probe {
        http_get {
          path = "/healthz"
        }
      }
    }
  }

  lifecycle {
    # cloudbuild.yaml deploys each new image with `gcloud run deploy`, which also stamps the
    # client fields and writes template annotations and labels of its own (e.g.
    # client.knative.dev/user-image); without this, the next `terraform apply` would roll the
    # image back and start a new revision each time. This configuration sets none of them.
    # Volumes, mounts and env stay managed: a new rules_secret_version must reach the service.
    ignore_changes = [
      template[0].containers[0].image,
      template[0].annotations,
      template[0].labels,
      client,
      client_version,
    ]

    precondition {
      condition     = (var.rules_secret == "") == (var.rules_secret_version == "")
      error_message = "rules_secret and rules_secret_version go together: a secret ID and a version number, or neither (no rules file)."
    }

    precondition {
      condition     = var.object_name_prefix == "" || var.delivery == "pubsub"
      error_message = "object_name_prefix filters a Cloud Storage notification config, so it needs delivery = \"pubsub\"; Eventarc triggers cannot filter by name (route by name in the rules file instead)."
    }
  }

  # The database comes through IDEMPOTENCY_STORE; its TTL policies, index exemptions and grant are
  # waited for too, so the first revision starts with everything its store needs.
  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.runtime_reads_sendgrid_key,
    google_secret_manager_secret_iam_member.runtime_reads_rules,
    google_firestore_field.expire_at,
    google_firestore_field.unindexed,
    google_project_iam_member.runtime_uses_store,
  ]
}

# ---------------------------------------------------------------------------------------------
# One trigger per event type: each matches the type and the bucket, lives in the bucket's
# location (Eventarc requires it) and posts CloudEvents to the service's "/". None before
# var.create_triggers: the first revision's placeholder image would acknowledge every event. None
# with delivery = "pubsub" either.
# ---------------------------------------------------------------------------------------------

resource "google_eventarc_trigger" "storage" {
  for_each = var.create_triggers && local.eventarc ? local.event_types : {}

  name            = "${var.service}-${each.key}"
  location        = lower(data.google_storage_bucket.watched.location)
  service_account = google_service_account.trigger.email

  matching_criteria {
    attribute = "type"
    value     = each.value
  }

  matching_criteria {
    attribute = "bucket"
    value     = var.bucket
  }

  destination {
    cloud_run_service {
      service = google_cloud_run_v2_service.notifier.name
      region  = google_cloud_run_v2_service.notifier.location
      path    = "/"
    }
  }

  depends_on = [
    google_project_service.apis,
    google_project_iam_member.gcs_publishes_events,
    google_project_iam_member.trigger_receives_events,
    google_service_account_iam_member.pubsub_signs_for_trigger,
    google_cloud_run_v2_service_iam_member.trigger_invokes,
  ]
}

# ---------------------------------------------------------------------------------------------
# delivery = "pubsub": the bucket's own notification config (Cloud Storage docs, "Pub/Sub
# notifications for Cloud Storage") publishes each change to a topic, and a push subscription
# posts it to the service's "/" in the wrapped push format, with the trigger account's OIDC token
# for the audience the service checks (EVENT_AUDIENCE), exactly like Eventarc's deliveries. The
# topics exist from the first apply; the notification config and the subscription, like the
# triggers, only with var.create_triggers.
# ---------------------------------------------------------------------------------------------

# Messages are encrypted at rest with a Google-managed key, as Eventarc's own topics are. They
# carry object metadata the bucket already holds, and the 7-day retention bounds them.
resource "google_pubsub_topic" "notifications" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption, as for Eventarc's topics; a customer key would add a KMS key, its grants to the Pub/Sub and storage agents and its rotation for object metadata the bucket already holds
  count = local.pubsub ? 1 : 0

  name = "${var.service}-notifications"

  depends_on = [google_project_service.apis]
}

# Where Pub/Sub forwards a message after 10 failed deliveries. A topic without a subscription
# drops what it receives (Pub/Sub docs, "Dead-letter topics"), so the pull subscription below holds
# them for 7 days, the longest Pub/Sub keeps a message.
resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption, as for the notifications topic whose messages it holds
  count = local.pubsub ? 1 : 0

  name = "${var.service}-dead-letter"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription" "dead_letter" {
  count = local.pubsub ? 1 : 0

  name                       = "${var.service}-dead-letter"
  topic                      = google_pubsub_topic.dead_letter[0].id
  message_retention_duration = "604800s"

  expiration_policy {
    ttl = "" # never: nobody pulls from it until something went wrong
  }
}

# Cloud Storage publishes as its service agent, to this topic only (the provider's
# google_storage_notification docs grant roles/pubsub.publisher on the topic).
resource "google_pubsub_topic_iam_member" "gcs_publishes_notifications" {
  count = local.pubsub ? 1 : 0

  topic  = google_pubsub_topic.notifications[0].id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# Dead lettering (Pub/Sub docs, "Dead-letter topics", grant forwarding permissions): the Pub/Sub
# service agent publishes to the dead-letter topic and acknowledges on the source subscription.
# Without both, Pub/Sub neither counts the attempts nor forwards: it retries until retention ends.
resource "google_pubsub_topic_iam_member" "pubsub_forwards_dead_letters" {
  count = local.pubsub ? 1 : 0

  topic  = google_pubsub_topic.dead_letter[0].id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_service_agent
}

resource "google_pubsub_subscription_iam_member" "pubsub_acknowledges_dead_letters" {
  count = var.create_triggers && local.pubsub ? 1 : 0

  subscription = google_pubsub_subscription.push[0].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent
}

resource "google_pubsub_subscription" "push" {
  count = var.create_triggers && local.pubsub ? 1 : 0

  name  = "${var.service}-push"
  topic = google_pubsub_topic.notifications[0].id

  # How long Pub/Sub waits for the answer to a push before it counts a failed attempt: beyond the
  # service's 60 s request timeout, so a slow send is answered (or ended by Cloud Run) first
  # rather than pushed a second time while it runs.
  ack_deadline_seconds = 90

  # As long as Eventarc keeps an event. The service keeps done marks 25 hours, so a redelivery after
  # that could send a second email; with the dead-letter policy a message leaves within about an
  # hour anyway (10 attempts, backoff from 10 s to 10 min).
  message_retention_duration = "86400s"

  expiration_policy {
    ttl = "" # never: the default expires a subscription after 31 days without deliveries
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[0].id
    max_delivery_attempts = 10
  }

  push_config {
    push_endpoint = "${google_cloud_run_v2_service.notifier.uri}/"

    oidc_token {
      service_account_email = google_service_account.trigger.email
      audience              = local.event_audience
    }
  }

  depends_on = [
    google_project_service.apis,
    google_cloud_run_v2_service_iam_member.trigger_invokes,
    google_service_account_iam_member.pubsub_signs_for_trigger,
    google_pubsub_topic_iam_member.pubsub_forwards_dead_letters,
  ]
}

# Created after the subscription, so no change is published to a topic nobody reads yet. The
# provider's docs: depend on the publisher grant, or the first publish may meet an IAM race.
resource "google_storage_notification" "bucket" {
  count = var.create_triggers && local.pubsub ? 1 : 0

  bucket             = var.bucket
  topic              = google_pubsub_topic.notifications[0].id
  payload_format     = "JSON_API_V1"
  event_types        = local.notification_event_types
  object_name_prefix = var.object_name_prefix == "" ? null : var.object_name_prefix

  depends_on = [
    google_pubsub_topic_iam_member.gcs_publishes_notifications,
    google_pubsub_subscription.push,
  ]
}

# ---------------------------------------------------------------------------------------------
# Digests (README, "Digests on Cloud Run"): a digest route's window closes with no event to wake
# the service, and between requests Cloud Run throttles the CPU (cpu_idle above), so the service's
# own flush timer may not run. Cloud Scheduler calls POST /digests/flush every minute instead,
# with the trigger account's OIDC token for the same audience the service checks on events: the
# flush is protected exactly like POST / (EVENT_AUTH), and that account already holds
# roles/run.invoker on the service. Cloud Scheduler docs ("Use authentication with HTTP
# targets"): the token's account must be in the job's project and hold the invoker role, and the
# Cloud Scheduler service agent mints the token with the role roles/cloudscheduler.serviceAgent,
# granted when the API is enabled; no other grant is needed. Whoever runs `terraform apply` needs
# iam.serviceAccounts.actAs on the trigger account (a project Owner has it).
# ---------------------------------------------------------------------------------------------

resource "google_cloud_scheduler_job" "digest_flush" {
  count = var.digest_schedule == "" ? 0 : 1

  name        = "${var.service}-digest-flush"
  description = "Sends the due digest windows of ${var.service} (POST /digests/flush)."
  region      = google_cloud_run_v2_service.notifier.location
  schedule    = var.digest_schedule
  time_zone   = "Etc/UTC"

  # Well below the service's 60 s request timeout, so Cloud Scheduler gives up (and retries)
  # before Cloud Run cuts the request. A window that was not sent stays pending for the next
  # call, and a flush claims each window with a lease, so overlapping calls or a retry never
  # send one twice.
  attempt_deadline = "30s"

  # A failed call (a cold start refused, a deploy in progress) is tried again within the minute.
  retry_config {
    retry_count          = 3
    min_backoff_duration = "5s"
    max_backoff_duration = "20s"
    max_doublings        = 2
  }

  http_target {
    http_method = "POST"
    uri         = "${google_cloud_run_v2_service.notifier.uri}/digests/flush"

    oidc_token {
      service_account_email = google_service_account.trigger.email
      audience              = local.event_audience
    }
  }

  depends_on = [
    google_project_service.apis,
    google_cloud_run_v2_service_iam_member.trigger_invokes,
  ]
}

# ---------------------------------------------------------------------------------------------
# Eventarc drops an event 24 hours after it was published if the service never answered 2xx
# (Eventarc docs, "Retry events"). A dead-letter topic would need settings on the subscription
# Eventarc creates and owns, which google_eventarc_trigger does not expose; so each trigger's
# subscription gets an alert on its oldest undelivered event instead, raised with most of the day
# left to fix the cause (SendGrid down, a revoked key, a broken revision). Retention is not
# lengthened on purpose: the service keeps done marks 25 hours, so a redelivery after that could
# send a second email.
# ---------------------------------------------------------------------------------------------

resource "google_monitoring_alert_policy" "undelivered_events" {
  for_each = google_eventarc_trigger.storage

  display_name          = "${each.value.name}: events undelivered"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "Oldest undelivered event older than ${var.alert_after_seconds} s"

    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\" AND resource.labels.subscription_id = \"${local.subscription_ids[each.key]}\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.alert_after_seconds
      duration        = "0s"

      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Eventarc trigger ${each.value.name} has not delivered an event for ${var.alert_after_seconds} s; Eventarc drops it 24 hours after it was published. Read the service's errors: `gcloud run services logs read ${var.service} --region=${var.region} --log-filter='severity>=WARNING'` (README, \"Running it on Cloud Run\")."
  }

  depends_on = [google_project_service.apis]
}

# delivery = "pubsub": one alert on both ends of the push subscription. A message in the
# dead-letter subscription was refused 10 times (a 5xx, or a 4xx the service gives a malformed or
# unauthenticated push): read the logs, fix the cause, and replay it (README, "Eventarc or Pub/Sub
# delivery"). A push still unacknowledged after alert_after_seconds means attempts fail without
# being dead-lettered (e.g. the forwarding grants are gone), and the subscription drops it 24 hours
# after it was published.
resource "google_monitoring_alert_policy" "notifications_undelivered" {
  count = var.create_triggers && local.pubsub ? 1 : 0

  display_name          = "${var.service}: notifications dead-lettered or undelivered"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "A notification was dead-lettered after 10 attempts"

    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND metric.type = \"pubsub.googleapis.com/subscription/num_undelivered_messages\" AND resource.labels.subscription_id = \"${google_pubsub_subscription.dead_letter[0].name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"

      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  conditions {
    display_name = "Oldest undelivered notification older than ${var.alert_after_seconds} s"

    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\" AND resource.labels.subscription_id = \"${google_pubsub_subscription.push[0].name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.alert_after_seconds
      duration        = "0s"

      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Pub/Sub could not deliver a change of gs://${var.bucket} to ${var.service}: it is in subscription ${google_pubsub_subscription.dead_letter[0].name} (kept 7 days) or still retried by ${google_pubsub_subscription.push[0].name} (dropped 24 hours after publishing). Read the service's errors: `gcloud run services logs read ${var.service} --region=${var.region} --log-filter='severity>=WARNING'`, then replay (README, \"Eventarc or Pub/Sub delivery\")."
  }

  depends_on = [google_project_service.apis]
}

# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

output "service_url" {
  description = "URL of the Cloud Run service (try $URL/datetime?requester=you)."
  value       = google_cloud_run_v2_service.notifier.uri
}

output "trigger_names" {
  description = "Eventarc trigger of each Cloud Storage event type."
  value       = { for key, trigger in google_eventarc_trigger.storage : local.event_types[key] => trigger.name }
}

output "pubsub_topic" {
  description = "Topic the bucket's notification config publishes to (null with delivery = \"eventarc\")."
  value       = one(google_pubsub_topic.notifications[*].name)
}

output "pubsub_subscription" {
  description = "Push subscription that delivers the notifications to the service (null with delivery = \"eventarc\", or before create_triggers)."
  value       = one(google_pubsub_subscription.push[*].name)
}

output "dead_letter_subscription" {
  description = "Subscription holding the notifications dead-lettered after 10 attempts, for 7 days (null with delivery = \"eventarc\")."
  value       = one(google_pubsub_subscription.dead_letter[*].name)
}

output "event_audience" {
  description = "The audience the service accepts in the trigger's token (EVENT_AUDIENCE)."
  value       = local.event_audience
}

output "digest_flush_job" {
  description = "Cloud Scheduler job that calls POST /digests/flush (null when digest_schedule is empty)."
  value       = one(google_cloud_scheduler_job.digest_flush[*].name)
}

output "runtime_service_account" {
  description = "Identity of the running service."
  value       = google_service_account.runtime.email
}

output "trigger_service_account" {
  description = "Identity the triggers deliver events with (EVENT_INVOKERS)."
  value       = google_service_account.trigger.email
}
