# Cloud resources for scenecluster on Ray, from an empty AWS account (infra/README.md walks through it):
#   - an S3 bucket for scenes, outputs and Ray checkpoints (private, KMS-encrypted, versioned with a lifecycle);
#   - an ECR repository for the image of infra/Dockerfile (immutable tags, scanned on push);
#   - two roles with instance profiles for cluster_configs/aws-gpu.yaml: the head's (S3, ECR pull, and the EC2
#     rights its autoscaler needs to start and stop workers of this cluster only) and the workers' (S3, ECR pull);
#   - optionally, a role for the Kubernetes service account `scenecluster-ray` (IRSA) of cluster_configs/kuberay/.
#   terraform init && terraform apply -var bucket_name=my-scenecluster
#
# checkov runs on this file in tests/unit/test_cluster_lint.py; each check it skips is justified where it is skipped.
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "bucket_name" {
  type        = string
  description = "globally unique S3 bucket name for scenes, outputs and Ray checkpoints"
}

variable "cluster_name" {
  type        = string
  default     = "scenecluster"
  description = "cluster_name of cluster_configs/aws-gpu.yaml: the head may only stop and terminate instances tagged with it"
}

variable "create_spot_service_linked_role" {
  type        = bool
  default     = true
  description = "create AWSServiceRoleForEC2Spot, which spot workers need once per account (false if it exists)"
}

variable "eks_oidc_provider_arn" {
  type        = string
  default     = ""
  description = "for KubeRay on EKS: the cluster's IAM OIDC provider ARN; empty creates no IRSA role"
}

variable "eks_namespace" {
  type    = string
  default = "default"
}

provider "aws" {
  region = var.region
}

data "aws_caller_identity" "current" {}

locals {
  account = data.aws_caller_identity.current.account_id
  ec2_arn = "arn:aws:ec2:${var.region}:${local.account}"
}

# ------------------------------------------------------------------------------------------------ S3 bucket
resource "aws_s3_bucket" "scenes" {
  # checkov:skip=CKV_AWS_18: access logs would need a second bucket; the data here are copies of scene archives and recomputable outputs, and CloudTrail data events can be turned on where an audit trail is required
  # checkov:skip=CKV_AWS_144: cross-region replication doubles storage for data that are copies (the archive of record lives elsewhere) or outputs a job recomputes
  # checkov:skip=CKV2_AWS_62: nothing consumes bucket events: jobs are submitted explicitly, not triggered by uploads
  bucket = var.bucket_name
}

resource "aws_s3_bucket_public_access_block" "scenes" {
  bucket                  = aws_s3_bucket.scenes.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "scenes" {
  bucket = aws_s3_bucket.scenes.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms" # the account's aws/s3 key: usable through S3 by the roles below without KMS grants
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "scenes" {
  bucket = aws_s3_bucket.scenes.id
  versioning_configuration {
    status = "Enabled"
  }
}

# Jobs rewrite outputs and checkpoints often: old versions and abandoned multipart uploads are removed after a week.
resource "aws_s3_bucket_lifecycle_configuration" "scenes" {
  depends_on = [aws_s3_bucket_versioning.scenes]
  bucket     = aws_s3_bucket.scenes.id
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# ----------------------------------------------------------------------------------------------- ECR repository
resource "aws_ecr_repository" "image" {
  name                 = "scenecluster"
  image_tag_mutability = "IMMUTABLE" # a tag names one build: every node of a cluster runs the same image
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
  }
}

# ----------------------------------------------------------------------------------------- roles of the nodes
data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# What every node needs: the bucket, and pulling the image.
data "aws_iam_policy_document" "node" {
  statement {
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.scenes.arn]
  }
  statement {
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.scenes.arn}/*"]
  }
  statement {
    actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
    resources = [aws_ecr_repository.image.arn]
  }
  statement {
    actions   = ["ecr:GetAuthorizationToken"] # account-wide by design: it has no resource to scope to
    resources = ["*"]
  }
}

resource "aws_iam_role" "worker" {
  name               = "scenecluster-ray-worker"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_role_policy" "worker" {
  name   = "scenecluster-node"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.node.json
}

resource "aws_iam_instance_profile" "worker" {
  name = "scenecluster-ray-worker"
  role = aws_iam_role.worker.name
}

resource "aws_iam_role" "head" {
  name               = "scenecluster-ray-head"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_role_policy" "head_node" {
  name   = "scenecluster-node"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.node.json
}

# The launcher's autoscaler on the head starts workers with the worker profile and stops only instances that carry
# this cluster's ray-cluster-name tag (Ray tags every instance it launches with it).
data "aws_iam_policy_document" "autoscaler" {
  statement {
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*", "${local.ec2_arn}:network-interface/*",
      "${local.ec2_arn}:subnet/*", "${local.ec2_arn}:security-group/*", "${local.ec2_arn}:key-pair/*",
      "arn:aws:ec2:${var.region}::image/*",
    ]
  }
  statement {
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }
  statement {
    actions   = ["ec2:TerminateInstances", "ec2:StartInstances", "ec2:StopInstances", "ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }
  statement {
    actions = [
      "ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs", "ec2:DescribeAvailabilityZones",
    ]
    resources = ["*"] # Describe calls take no resource ARN
  }
  statement {
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]
  }
  statement {
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.worker.arn]
  }
}

resource "aws_iam_role_policy" "autoscaler" {
  name   = "scenecluster-ray-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "head" {
  name = "scenecluster-ray-head"
  role = aws_iam_role.head.name
}

resource "aws_iam_service_linked_role" "spot" {
  count            = var.create_spot_service_linked_role ? 1 : 0
  aws_service_name = "spot.amazonaws.com"
}

# ------------------------------------------------------------------------- KubeRay on EKS: IRSA role (optional)
data "aws_iam_policy_document" "assume_irsa" {
  count = var.eks_oidc_provider_arn == "" ? 0 : 1
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${replace(var.eks_oidc_provider_arn, "/^.*oidc-provider\\//", "")}:sub"
      values   = ["system:serviceaccount:${var.eks_namespace}:scenecluster-ray"]
    }
  }
}

resource "aws_iam_role" "irsa" {
  count              = var.eks_oidc_provider_arn == "" ? 0 : 1
  name               = "scenecluster-ray-k8s"
  assume_role_policy = data.aws_iam_policy_document.assume_irsa[0].json
}

resource "aws_iam_role_policy" "irsa" {
  count  = var.eks_oidc_provider_arn == "" ? 0 : 1
  name   = "scenecluster-node"
  role   = aws_iam_role.irsa[0].id
  policy = data.aws_iam_policy_document.node.json
}

output "bucket" {
  value = aws_s3_bucket.scenes.bucket
}

output "image_repository" {
  value = aws_ecr_repository.image.repository_url
}

output "head_instance_profile" {
  value = aws_iam_instance_profile.head.name
}

output "worker_instance_profile" {
  value = aws_iam_instance_profile.worker.name
}

output "irsa_role_arn" {
  value = var.eks_oidc_provider_arn == "" ? "" : aws_iam_role.irsa[0].arn
}
