{{/* The LLMService's name: nameOverride, else the release name (it names a Service: at most 45). */}}
{{- define "llmservice.name" -}}
{{- default .Release.Name .Values.nameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{- define "llmservice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ .Release.Name }}
{{- end }}
