"""Names shared by the CRD, the builders, the API layer and the handlers."""

GROUP = "serving.llmservice.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMService"
PLURAL = "llmservices"

FIELD_MANAGER = "llmservice-operator"
OPERATOR_NAME = "llmservice-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
APP_NAME = "llmservice"

# Annotations the operator writes on what it owns.
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
ANNOTATION_APPLIED_HASH = f"{GROUP}/applied-hash"

# The inference server's contract (inference_image/): port, probes, mount points.
SERVER_PORT = 8000
SERVER_PORT_NAME = "http"
SERVICE_PORT = 80
CACHE_MOUNT = "/var/cache/llm"
PVC_MOUNT_ROOT = "/mnt/pvc"
HEALTH_READY_PATH = "/health/ready"
HEALTH_LIVE_PATH = "/health/live"
METRICS_PATH = "/metrics"
GPU_RESOURCE = "nvidia.com/gpu"

# metadata.name cap: "<name>-<10-char rs hash>-<5-char pod suffix>" must fit a 63-character hostname.
MAX_NAME_LENGTH = 45

# Lists come in pages of this many objects (the API server's `limit`), so a start-up or resync in a large
# cluster never holds one huge response.
LIST_CHUNK_SIZE = 500
