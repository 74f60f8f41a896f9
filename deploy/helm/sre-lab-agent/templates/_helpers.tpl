{{/* The chart's name (the app.kubernetes.io/name label). */}}
{{- define "sre-lab-agent.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name, or release-chart when the release does not name the chart. */}}
{{- define "sre-lab-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sre-lab-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sre-lab-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Selector labels: what the DaemonSet, Service and ServiceMonitor select pods by. */}}
{{- define "sre-lab-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sre-lab-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: sre-lab
{{- end }}

{{/* Helm's own labels, shared by every object. */}}
{{- define "sre-lab-agent.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "sre-lab-agent.labels" -}}
{{ include "sre-lab-agent.selectorLabels" . }}
{{ include "sre-lab-agent.helmLabels" . }}
{{- end }}

{{/* The agent's configuration: the `config` value, else the chart's default (deploy/base/agent.yml). */}}
{{- define "sre-lab-agent.config" -}}
{{- if .Values.config }}
{{- .Values.config }}
{{- else }}
{{- .Files.Get "files/agent.yml" }}
{{- end }}
{{- end }}
