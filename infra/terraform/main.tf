# Minimal cloud resources for scenecluster on Ray: one S3 bucket for scenes, outputs and checkpoints, and
# an IAM role + instance profile that lets the Ray nodes use it without static keys.
#   terraform init && terraform apply -var bucket_name=my-scenecluster
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

provider "aws" {
  region = var.region
}

resource "aws_s3_bucket" "scenes" {
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
      sse_algorithm = "AES256"
    }
  }
}

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_node" {
  name               = "scenecluster-ray-node"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

data "aws_iam_policy_document" "scenes_rw" {
  statement {
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.scenes.arn]
  }
  statement {
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.scenes.arn}/*"]
  }
}

resource "aws_iam_role_policy" "scenes_rw" {
  name   = "scenecluster-s3"
  role   = aws_iam_role.ray_node.id
  policy = data.aws_iam_policy_document.scenes_rw.json
}

# The Ray cluster launcher's head starts and stops the GPU workers itself, so it needs EC2 rights and
# iam:PassRole for this same role. Scope down further for production.
data "aws_iam_policy_document" "autoscaler" {
  statement {
    actions = [
      "ec2:RunInstances", "ec2:TerminateInstances", "ec2:StartInstances", "ec2:StopInstances",
      "ec2:Describe*", "ec2:CreateTags",
    ]
    resources = ["*"]
  }
  statement {
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.ray_node.arn]
  }
}

resource "aws_iam_role_policy" "autoscaler" {
  name   = "scenecluster-ray-autoscaler"
  role   = aws_iam_role.ray_node.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "ray_node" {
  name = "scenecluster-ray-node"
  role = aws_iam_role.ray_node.name
}

output "bucket" {
  value = aws_s3_bucket.scenes.bucket
}

output "instance_profile" {
  value = aws_iam_instance_profile.ray_node.name
}
