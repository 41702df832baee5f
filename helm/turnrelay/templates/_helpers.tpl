{{/* Chart name, overridable. */}}
{{- define "turnrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "turnrelay.fullname" -}}
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

{{- define "turnrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the operator pod. */}}
{{- define "turnrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "turnrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Standard labels. */}}
{{- define "turnrelay.labels" -}}
helm.sh/chart: {{ include "turnrelay.chart" . }}
{{ include "turnrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: turnrelay
{{- end }}

{{- define "turnrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "turnrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* What the operator does to TurnRegions and their children, for a Role or a ClusterRole. */}}
{{- define "turnrelay.operatorRules" -}}
- apiGroups: [turnrelay.io]
  resources: [turnregions]
  verbs: [get, list, watch, patch]
- apiGroups: [turnrelay.io]
  resources: [turnregions/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
# Watched, so the status follows the relays' readiness and nodes at once; patched with an
# annotation (the region directory's version) so the kubelet updates their mounted directory now.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, create, patch, delete]
# Only read, for the resourceVersion that rolls relays when a mounted Secret changes.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# kopf reports handler failures as Events.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
