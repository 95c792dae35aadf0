# The host machine image: Ubuntu with Docker, the NVIDIA driver and container toolkit, the
# host-service binary and its systemd unit. Hosts boot it with the first-boot user data in
# user-data.sh (the scaling-service's --user-data-file), which writes the service's settings and
# starts it.
#
#   make host-binary            # target/release/host-service
#   packer build -var region=us-east-1 deploy/packer/host-ami.pkr.hcl
#
# The AMI id it prints goes into whist.images (see docs/operations.md, "Upgrade the host image").

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region the image is built in (copy it to others with ami_regions)."
}

variable "ami_regions" {
  type        = list(string)
  default     = []
  description = "Further regions the finished image is copied to."
}

variable "instance_type" {
  type        = string
  default     = "g4dn.xlarge"
  description = "Builder machine; a GPU type, so the driver is installed against real hardware."
}

variable "host_service_binary" {
  type        = string
  default     = "target/release/host-service"
  description = "The host-service binary to bake in (path relative to the repository root)."
}

variable "host_commit" {
  type        = string
  default     = "local_dev"
  description = "Commit the binary was built from; recorded on the image and checked at registration."
}

variable "mandelbox_images" {
  type        = list(string)
  default     = []
  description = "Mandelbox images to pull into the image so hosts start sessions without a pull."
}

variable "nvidia_driver_package" {
  type    = string
  default = "nvidia-driver-535-server"
}

locals {
  timestamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "host" {
  region        = var.region
  ami_regions   = var.ami_regions
  instance_type = var.instance_type
  ssh_username  = "ubuntu"
  ami_name      = "whist-host-${var.host_commit}-${local.timestamp}"

  source_ami_filter {
    filters = {
      name                = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["099720109477"] # Canonical
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = 64
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }

  tags = {
    "whist:host-commit" = var.host_commit
    "whist:component"   = "host"
  }
}

build {
  sources = ["source.amazon-ebs.host"]

  provisioner "file" {
    source      = var.host_service_binary
    destination = "/tmp/host-service"
  }

  provisioner "file" {
    source      = "deploy/packer/files/host-service.service"
    destination = "/tmp/host-service.service"
  }

  provisioner "shell" {
    script          = "deploy/packer/scripts/provision-host.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "NVIDIA_DRIVER_PACKAGE=${var.nvidia_driver_package}",
      "MANDELBOX_IMAGES=${join(" ", var.mandelbox_images)}",
    ]
  }
}
