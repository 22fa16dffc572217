{{/* Chart name, truncated to fit a label. */}}
{{- define "llmservice-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, unless it already contains the chart name. */}}
{{- define "llmservice-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llmservice-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmservice-operator.labels" -}}
helm.sh/chart: {{ include "llmservice-operator.chart" . }}
{{ include "llmservice-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llmservice-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmservice-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llmservice-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmservice-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llmservice-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* kubernetes or openshift: .Values.platform, else detected. OpenShift's restricted-v2 SCC assigns UID, GID
and fsGroup from the namespace's range and refuses pods that fix them outside it. `helm template` sees the
security.openshift.io API group only with --api-versions. */}}
{{- define "llmservice-operator.platform" -}}
{{- .Values.platform | default (ternary "openshift" "kubernetes" (.Capabilities.APIVersions.Has "security.openshift.io/v1")) }}
{{- end }}

{{/* Peering name: one per release, so that two releases never share a lock. */}}
{{- define "llmservice-operator.peering" -}}
{{- include "llmservice-operator.fullname" . }}
{{- end }}

{{/* The application rules (what the reconciler reads and writes), shared by ClusterRole and Roles. */}}
{{- define "llmservice-operator.applicationRules" -}}
# LLMServices: watched through kopf; get confirms an owner exists before a child is recreated;
# patch carries kopf's progress annotations; the status subresource carries conditions.
- apiGroups: ["serving.llmservice.io"]
  resources: ["llmservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["serving.llmservice.io"]
  resources: ["llmservices/status"]
  verbs: ["patch"]
# Children's owner references block their owner's foreground deletion (blockOwnerDeletion), which the
# OwnerReferencesPermissionEnforcement admission plugin (on by default in OpenShift) allows only to those
# who may update the owner's finalizers.
- apiGroups: ["serving.llmservice.io"]
  resources: ["llmservices/finalizers"]
  verbs: ["update"]
# Children: server-side apply (patch) updates, and the API server authorizes an apply that creates the
# object as `create` as well; get checks a name is free before a child is created (never taking over an
# object the operator did not create); HPA, PDB and NetworkPolicy are deleted when the spec drops them.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods: read-only, for status (Unschedulable, ImagePullBackOff, CrashLoopBackOff, termination messages)
# and for the IPs of the ready ones, whose adapters the operator sets through their API.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Secrets: get only. RBAC cannot narrow it to the Secrets LLMServices name in spec.apiKeySecretRef, but
# those are the only ones the operator reads, to call the pods' adapter API (never logged nor written).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events on LLMServices.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
