# Cloud Storage -> Eventarc -> Cloud Run -> email, in one `terraform apply` (README, "Deploy").
#
# Terraform owns the project wiring: APIs, two service accounts, IAM grants, the Cloud Run service
# and one Eventarc trigger per Cloud Storage event type. Cloud Build (cloudbuild.yaml) owns the
# image: every `gcloud builds submit` deploys a new revision of this same service, so Terraform
# ignores later image changes (see `lifecycle` below).
#
# Offline checks: tests/deploy/test_terraform.py (structure, via python-hcl2) and checkov
# (.ci/check_deploy.sh). Argument names follow the hashicorp/google provider documentation.

terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 8.0"
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
  description = "Image of the first revision. Later revisions come from cloudbuild.yaml. The default is Google's sample that answers on $PORT, so the service can exist before the first build."
  type        = string
  default     = "us-docker.pkg.dev/cloudrun/container/hello"
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
  description = "Version of that secret to mount (a number, or latest)."
  type        = string
  default     = "latest"
}

variable "public_datetime" {
  description = "Let anyone call the service (GET /datetime, like the book's public HTTP function). Events stay protected: the service checks the trigger's OIDC token itself (EVENT_AUTH=oidc)."
  type        = bool
  default     = true
}

variable "deletion_protection" {
  description = "Refuse `terraform destroy` of the Cloud Run service (the provider's default is true)."
  type        = bool
  default     = true
}

variable "redis_url" {
  description = "redis://HOST:PORT/DB of a Memorystore instance. Empty: deduplicate in SQLite on the instance, which is only correct with a single instance."
  type        = string
  default     = ""
  sensitive   = true
}

variable "max_instances" {
  description = "Maximum instances when redis_url is set (without it the service runs one instance)."
  type        = number
  default     = 10
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

  # The filesystem of a Cloud Run instance is its own: SQLite deduplicates only within one
  # instance, so without Redis the service is capped at one instance (80 concurrent requests).
  idempotency_store  = var.redis_url == "" ? "sqlite:////tmp/gcs-notifier/state/notifier.db" : var.redis_url
  max_instance_count = var.redis_url == "" ? 1 : var.max_instances

  apis = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "eventarc.googleapis.com",
    "iam.googleapis.com",
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

resource "google_project_iam_member" "trigger_receives_events" {
  project = var.project
  role    = "roles/eventarc.eventReceiver"
  member  = "serviceAccount:${google_service_account.trigger.email}"
}

resource "google_project_iam_member" "gcs_publishes_events" {
  project = var.project
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# Eventarc docs: in projects created before 8 April 2021 the Pub/Sub service agent needs the right
# to mint OIDC tokens for push deliveries; granted on the trigger account only, not project-wide.
resource "google_service_account_iam_member" "pubsub_signs_for_trigger" {
  service_account_id = google_service_account.trigger.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
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
resource "google_cloud_run_v2_service_iam_member" "public_datetime" {
  count = var.public_datetime ? 1 : 0

  project  = var.project
  location = google_cloud_run_v2_service.notifier.location
  name     = google_cloud_run_v2_service.notifier.name
  role     = "roles/run.invoker"
  member   = "allUsers"
}

# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------

resource "google_cloud_run_v2_service" "notifier" {
  name                = var.service
  location            = var.region
  deletion_protection = var.deletion_protection
  ingress             = "INGRESS_TRAFFIC_ALL"

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
        value = "oidc"
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

      startup_probe {
        http_get {
          path = "/healthz"
        }
      }
    }
  }

  lifecycle {
    # cloudbuild.yaml deploys each new image with `gcloud run deploy`, which also stamps the
    # client fields; without this, the next `terraform apply` would roll the image back.
    ignore_changes = [
      template[0].containers[0].image,
      client,
      client_version,
    ]
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.runtime_reads_sendgrid_key,
  ]
}

# ---------------------------------------------------------------------------------------------
# One trigger per event type: each matches the type and the bucket, lives in the bucket's
# location (Eventarc requires it) and posts CloudEvents to the service's "/".
# ---------------------------------------------------------------------------------------------

resource "google_eventarc_trigger" "storage" {
  for_each = local.event_types

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

output "runtime_service_account" {
  description = "Identity of the running service."
  value       = google_service_account.runtime.email
}

output "trigger_service_account" {
  description = "Identity the triggers deliver events with (EVENT_INVOKERS)."
  value       = google_service_account.trigger.email
}
