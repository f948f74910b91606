{{- define "spiderpool.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "spiderpool.labels" -}}
app.kubernetes.io/part-of: spiderpool
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "spiderpool.webhookClient" -}}
{{- if .Values.spiderpoolController.webhookURL -}}
url: {{ trimSuffix "/" .Values.spiderpoolController.webhookURL }}{{ .path }}
{{- else -}}
service:
  name: {{ .Values.spiderpoolController.name }}
  namespace: {{ .Release.Namespace }}
  port: {{ .Values.spiderpoolController.webhookPort }}
  path: {{ .path }}
{{- end -}}
{{- end -}}
