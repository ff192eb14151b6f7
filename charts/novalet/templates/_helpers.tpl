{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "novalet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name for every object; cluster-scoped objects carry it too, so two
releases never collide on ClusterRoles. Short enough for "-controller" to fit in 63. */}}
{{- define "novalet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else if contains (include "novalet.name" .) .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "novalet.name" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "novalet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "novalet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (list . "agent"). */}}
{{- define "novalet.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "novalet.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "novalet.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "novalet.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "novalet.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "novalet.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "novalet.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The name the apiserver uses to reach the webhook: explicit, else the fixed ClusterIP, else the
Service's DNS name. */}}
{{- define "novalet.webhookHost" -}}
{{- if .Values.controller.webhook.host }}
{{- .Values.controller.webhook.host }}
{{- else }}
{{- printf "%s-controller.%s.svc" (include "novalet.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The ValidatingWebhookConfiguration the chart installs. */}}
{{- define "novalet.webhookConfigurationName" -}}
{{- printf "%s-validate" (include "novalet.fullname" .) }}
{{- end }}

{{/* The Secret with the webhook's serving certificate the controller mounts. */}}
{{- define "novalet.webhookTLSSecret" -}}
{{- default (printf "%s-webhook-tls" (include "novalet.fullname" .)) .Values.controller.tls.secretName }}
{{- end }}
