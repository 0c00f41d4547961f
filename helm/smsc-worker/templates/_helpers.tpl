{{/*
Expand the name of the chart.
*/}}
{{- define "smsc-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "smsc-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "smsc-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "smsc-worker.labels" -}}
helm.sh/chart: {{ include "smsc-worker.chart" . }}
{{ include "smsc-worker.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "smsc-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smsc-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "smsc-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "smsc-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image: a digest pins it by content and wins over the tag.
*/}}
{{- define "smsc-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the secret settings: the user's existing one or the chart's.
*/}}
{{- define "smsc-worker.secretName" -}}
{{- default (include "smsc-worker.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
A setting's value as its environment variable's text. toJson, because Helm holds numbers
from values files as float64 and would print 1000000 as 1e+06.
*/}}
{{- define "smsc-worker.settingValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the worker's drain time, rounded up, plus the extra for the
preStop wait and the shutdown after draining, so the kubelet never kills a draining worker.
*/}}
{{- define "smsc-worker.terminationGracePeriodSeconds" -}}
{{- $drain := .Values.settings.observability.drain_timeout_s | float64 | ceil | int }}
{{- add $drain .Values.terminationGraceExtraSeconds }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express; included by the Deployment so
that every render runs them.
*/}}
{{- define "smsc-worker.validate" -}}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are both true: enable at most one (KEDA creates an HPA of its own for the Deployment)" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (hasKey .Values.podDisruptionBudget "minAvailable") (hasKey .Values.podDisruptionBudget "maxUnavailable") }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- if ge (int .Values.preStopSleepSeconds) (int .Values.terminationGraceExtraSeconds) }}
{{- fail "preStopSleepSeconds must be shorter than terminationGraceExtraSeconds, or the wait eats into the worker's drain time" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.replySources) }}
{{- fail "networkPolicy.enabled is true but networkPolicy.replySources is empty: name the CIDRs the gateway's reply e-mails come from, or no reply could reach the pods" }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- if not .Values.secrets.amqpUrl }}
{{- fail "secrets.amqpUrl is required (or name a Secret holding SMSC_AMQP__URL in secrets.existingSecret)" }}
{{- end }}
{{- if not .Values.secrets.gatewayPassword }}
{{- fail "secrets.gatewayPassword is required (or name a Secret holding SMSC_GATEWAY__PASSWORD in secrets.existingSecret)" }}
{{- end }}
{{- end }}
{{- /* An existing Secret is taken to hold SMSC_STATE__URL, as it is taken to hold SMSC_AMQP__URL. */}}
{{- if not (or .Values.secrets.stateUrl .Values.secrets.existingSecret) }}
{{- $shared := "replicas share their ledger and limits in Redis; set secrets.stateUrl (or secrets.existingSecret with SMSC_STATE__URL)" }}
{{- if .Values.autoscaling.hpa.enabled }}
{{- fail (printf "autoscaling.hpa.enabled is true (up to %d replicas): %s" (int .Values.autoscaling.hpa.maxReplicas) $shared) }}
{{- else if .Values.autoscaling.keda.enabled }}
{{- fail (printf "autoscaling.keda.enabled is true (up to %d replicas): %s" (int .Values.autoscaling.keda.maxReplicaCount) $shared) }}
{{- else if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "replicaCount is %d: %s" (int .Values.replicaCount) $shared) }}
{{- end }}
{{- end }}
{{- end }}
