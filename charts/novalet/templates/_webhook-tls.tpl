{{/* Where the webhook's serving certificate comes from, one of three, first match wins:
  secret        controller.tls.secretName is set: your Secret; the chart makes no certificate and
                does not consult controller.tls.certManager
  cert-manager  controller.tls.certManager.enabled is true, or auto and the cluster serves
                cert-manager.io/v1 Certificate: a Certificate into <fullname>-webhook-tls, the
                caBundle filled by cert-manager's CA injector (controller-certificates.yaml)
  chart         otherwise: a CA and a certificate made by Helm into <fullname>-webhook-tls
                (controller-webhook.yaml)
enabled: true without cert-manager fails the render, naming the fix. */}}
{{- define "novalet.webhookCertSource" -}}
{{- $tls := .Values.controller.tls }}
{{- $enabled := toString $tls.certManager.enabled }}
{{- $served := .Capabilities.APIVersions.Has "cert-manager.io/v1/Certificate" }}
{{- if $tls.secretName }}
{{- "secret" }}
{{- else if eq $enabled "true" }}
{{- if not $served }}
{{- fail "controller.tls.certManager.enabled is true but the cluster does not serve cert-manager.io/v1 Certificate: install cert-manager first, or set controller.tls.certManager.enabled to auto (cert-manager when present, else a certificate made by the chart) or false (helm template: pass --api-versions cert-manager.io/v1/Certificate)" }}
{{- end }}
{{- "cert-manager" }}
{{- else if and (eq $enabled "auto") $served }}
{{- "cert-manager" }}
{{- else }}
{{- "chart" }}
{{- end }}
{{- end }}

{{/* The Certificate cert-manager issues the serving certificate from (its CA fills caBundle). */}}
{{- define "novalet.webhookCertificateName" -}}
{{- printf "%s-webhook" (include "novalet.fullname" .) }}
{{- end }}
